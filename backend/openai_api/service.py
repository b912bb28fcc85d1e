"""Chat completions and embeddings for OpenAI clients.

A completion calls the alias's provider directly (backend.inference.llm, through the model
registry), not a chat run: an OpenAI request carries its whole conversation and keeps nothing,
while a run belongs to a stored conversation, its memory and its event log. What a run enforces
is enforced here with the same parts: the `chat_run` rate limit, a token reservation charged as
the answer streams and settled into a usage record, and the agent's own rails (input, with the
earlier user messages rewritten as memory rewrites them; output, on the stream). Closing the
stream stops the model, as cancelling a run does.

A request that names a stored conversation (`sightline.conversation_id`) is a chat run instead:
RunService.send_message with its last message, relayed from the run's event log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from backend.agents.attribution import attributed, numbered
from backend.agents.graph import CITATION, SOURCES_PREAMBLE
from backend.agents.guards import GuardAction, GuardDecision, Guards
from backend.agents.models import ChatModel, ModelRegistry, request_key
from backend.agents.runs import CHARGE_EVERY, OnBusy, RunService, ServedHook
from backend.agents.tools import AgentTools, Source
from backend.auth.principal import Principal
from backend.config import ChatSettings, OpenAIAPISettings
from backend.core.db import Database
from backend.errors import (
    AppError,
    InternalError,
    NotFound,
    ServiceUnavailable,
    ValidationFailed,
)
from backend.inference.llm.base import (
    ChatMessage,
    LLMError,
    LLMProtocolError,
    LLMTimeout,
    LLMUnavailable,
    estimate_tokens,
)
from backend.knowledge.embeddings import Embedder, embed_timed
from backend.knowledge.service import EmbeddingSpent
from backend.lifecycle.drift import DriftRecorder
from backend.lifecycle.policy import RequestKey, split_pin
from backend.limits.budgets import BudgetExceeded, Budgets, Reservation, Resource
from backend.limits.pricing import SpendMetrics
from backend.limits.ratelimit import RateLimiter
from backend.openai_api.schemas import ChatCompletionRequest, EmbeddingRequest
from backend.realtime.eventlog import TOKEN_DELTA

log = logging.getLogger(__name__)

# A run's CitationAdded event as the response lists it (as the knowledge extra's citations).
_CITATION_FIELDS = (
    "index",
    "chunkId",
    "documentId",
    "title",
    "answerStart",
    "answerEnd",
    "span",
    "confidence",
    "explicit",
)
# OpenAI's finish reasons; a provider's own ("repetition": an answer cut in a loop) is a stop.
_FINISH = {"stop": "stop", "length": "length", "repetition": "stop"}


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


@dataclass(frozen=True)
class Piece:
    """What the client gets next: a piece of the answer, or a rail's decision (or both)."""

    text: str = ""
    rail: dict[str, str] | None = None  # {stage, rail, action, reason}, as GuardrailTriggered


@dataclass
class Completion:
    """One completion: what was asked, then what it produced (filled in while it streams)."""

    model: ChatModel  # the version that serves (routed by `key`)
    prompt: list[ChatMessage]
    max_tokens: int
    request: ChatCompletionRequest
    key: RequestKey | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    finish_reason: str | None = None
    reported_prompt_tokens: int | None = None  # as the model reported them
    reported_completion_tokens: int = 0
    pieces: int = 0  # pieces of text delivered
    model_called: bool = False  # (a message the input rails blocked never reaches it)
    left: bool = False  # the client went away before the answer ended
    money: Reservation | None = None  # the cost budget (holds nothing; charged with the tokens)
    rails: list[dict[str, str]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)  # numbered from 1, as the prompt has them
    answer: list[str] = field(default_factory=list)
    # a turn of a stored conversation: its run, its stored answer, the citations it reported
    run_id: uuid.UUID | None = None
    message_id: str | None = None
    cited: list[dict[str, Any]] = field(default_factory=list)
    # with the knowledge extra, an answer that cites no source as [n]: its sentences
    # attributed to sources by similarity (as a chat run's CitationAdded, `explicit` false)
    attributed: list[dict[str, Any]] = field(default_factory=list)

    def extension(self, *, rails: bool = True) -> dict[str, Any] | None:
        """The response's `sightline` field: the rails' decisions, and with the knowledge
        base on, the sources and the answer's citations of them (None: nothing to say)."""
        body: dict[str, Any] = {}
        if rails and self.rails:
            body["guardrails"] = self.rails
        conversation = self.request.sightline.conversation_id
        if conversation is not None and self.run_id is not None:
            body["conversationId"] = str(conversation)
            body["runId"] = str(self.run_id)
            body["messageId"] = self.message_id
            body["citations"] = self.cited
        if self.request.sightline.knowledge:
            body["sources"] = [
                {"index": n, "chunkId": s.chunk_id, "documentId": s.document_id, "title": s.title}
                for n, s in enumerate(self.sources, start=1)
            ]
            body["citations"] = self.citations()
        return body or None

    def citations(self) -> list[dict[str, Any]]:
        """Each source the answer cites as [n], at its first citation (as CitationAdded); with
        no [n] at all, the sentences attributed to sources."""
        answer, cited, found = "".join(self.answer), set(), []
        for match in CITATION.finditer(answer):
            n = int(match.group(1))
            if n in cited or not 1 <= n <= len(self.sources):
                continue
            cited.add(n)
            source = self.sources[n - 1]
            found.append(
                {
                    "index": n,
                    "chunkId": source.chunk_id,
                    "documentId": source.document_id,
                    "title": source.title,
                    "answerStart": match.start(),
                    "answerEnd": match.end(),
                    "span": source.span,
                    "confidence": 1.0,
                    "explicit": True,
                }
            )
        return found or self.attributed

    @property
    def prompt_tokens(self) -> int:
        if self.reported_prompt_tokens is not None:
            return self.reported_prompt_tokens
        return estimate_tokens(self.prompt) if self.model_called else 0

    @property
    def completion_tokens(self) -> int:
        return max(self.reported_completion_tokens, self.pieces)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class OpenAIService:
    def __init__(
        self,
        *,
        models: ModelRegistry,
        guards: Guards,
        limiter: RateLimiter,
        budgets: Budgets,
        db: Database,
        embedder: Callable[[], Embedder],
        chat: ChatSettings,
        settings: OpenAIAPISettings,
        tools: AgentTools | None = None,
        runs: RunService | None = None,
        served: ServedHook | None = None,
        metrics: SpendMetrics | None = None,
        embedded: EmbeddingSpent | None = None,
        drift: DriftRecorder | None = None,
    ) -> None:
        self.drift = drift  # each answer's drift samples, as a chat run's (None: drift off)
        # prices, records and charges an embeddings request as a search's query embedding
        self.embedded = embedded
        self.served = served  # the lifecycle's statistics, when wired
        self.metrics = metrics  # what completions cost (sightline_model_cost)
        # the knowledge extra: the agent's search, relevance check and citation similarity
        self._tools = tools or AgentTools()
        self._runs = runs
        self._models = models
        self._guards = guards
        self._limiter = limiter
        self._budgets = budgets
        self._db = db
        self._embedder = embedder  # the knowledge base's serving version's, when called
        self._chat = chat
        self._settings = settings

    async def enforce_query(self, principal: Principal) -> None:
        """A read (the models list) takes from the caller's `query` allowance, as on GraphQL."""
        await self._limiter.enforce(principal.subject, principal.plan, "query")

    def chat_models(self) -> list[ChatModel]:
        return self._models.aliases

    def chat_model(self, alias: str) -> ChatModel:
        for model in self._models.aliases:
            if model.alias == alias:
                return model
        raise ModelNotFound(f"The model {alias!r} does not exist.", model=alias)

    # -- chat completions ---------------------------------------------------------------------

    def prepare(self, request: ChatCompletionRequest, principal: Principal) -> Completion:
        """The completion a request asks for, checked (unknown model or version, limits)
        before any work. `model` is an alias or `alias@version`; the router picks the version
        of an alias for the caller (sticky: the same caller, the same version)."""
        self.chat_model(split_pin(request.model)[0])  # MODEL_NOT_FOUND for an unknown alias
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        key = request_key(
            principal, conversation_id=request.sightline.conversation_id, request_id=completion_id
        )
        model = self._models.resolve(request.model, key)  # BAD_USER_INPUT: unknown version
        if len(request.messages) > self._settings.max_messages:
            raise ValidationFailed(
                f"at most {self._settings.max_messages} messages", field="messages"
            )
        prompt = [
            ChatMessage("system" if m.role == "developer" else m.role, m.text)
            for m in request.messages
        ]
        if sum(len(m.content) for m in prompt) > self._settings.max_prompt_chars:
            raise ValidationFailed(
                f"the messages are longer than {self._settings.max_prompt_chars} characters",
                field="messages",
            )
        if not any(m.role == "user" for m in prompt):
            raise ValidationFailed("the messages have no user message", field="messages")
        if not any(m.role == "system" for m in prompt) and self._chat.system_prompt:
            prompt.insert(0, ChatMessage("system", self._chat.system_prompt))
        wanted = request.answer_tokens or self._chat.max_tokens
        return Completion(
            model=model,
            prompt=prompt,
            max_tokens=min(wanted, self._chat.max_tokens),
            request=request,
            key=key,
            id=completion_id,
        )

    async def stream(self, principal: Principal, completion: Completion) -> AsyncIterator[Piece]:
        """Runs the completion: rate limit, reservation, rails, the model. Closing the iterator
        stops the model; the tokens delivered are charged and recorded either way."""
        if completion.request.sightline.conversation_id is not None:
            async for piece in self._converse(principal, completion):
                yield piece
            return
        # held until the answer ends: a version retired meanwhile closes after it
        if not self._models.hold(completion.model):  # closed since prepare: routed again
            completion.model = self._models.checkout(completion.request.model, completion.key)
        try:
            await self._limiter.enforce(principal.subject, principal.plan, "chat_run")
            completion.money, reservation = await self._budgets.admit_and_reserve(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                plan=principal.plan,
                resource=Resource.LLM_TOKENS,
                amount=completion.max_tokens,
                subject=f"openai:{completion.id}",
            )
            started = time.perf_counter()
            try:
                async for piece in self._generate(principal, completion, reservation):
                    yield piece
            except (GeneratorExit, asyncio.CancelledError):
                completion.left = True
                raise
            finally:
                # Shielded: a client that leaves cancels this, and the usage must still be kept.
                await asyncio.shield(
                    self._settle(principal, completion, reservation, started=started)
                )
        finally:
            self._models.release(completion.model)

    async def _converse(
        self, principal: Principal, completion: Completion
    ) -> AsyncGenerator[Piece, None]:
        """A turn of a stored conversation: a chat run, exactly as sendMessage starts it (its
        memory, history, rails, limits and budget), relayed from its event log. The request's
        last message is the new one; a client that leaves cancels the run, as cancelRun does."""
        conversation_id = completion.request.sightline.conversation_id
        if self._runs is None or conversation_id is None:
            raise ServiceUnavailable("conversations are not served here")
        last = completion.prompt[-1]
        if last.role != "user":
            raise ValidationFailed(
                "in a conversation the last message is the user's new one", field="messages"
            )
        started = await self._runs.send_message(
            principal, conversation_id, last.content, OnBusy.REJECT, model=completion.request.model
        )
        run_id = completion.run_id = started.run.id
        run = started.run  # the version the run was routed to is the one that answers
        completion.model = self._models.find(run.model_alias or "", run.model_version) or (
            completion.model
        )
        ended = False
        try:
            events = await self._runs.stream(principal, run_id, None)
            async for event in events:
                data = event.data
                if event.type == TOKEN_DELTA:
                    completion.pieces += 1
                    completion.answer.append(str(data["text"]))
                    yield Piece(text=str(data["text"]))
                elif event.type == "GuardrailTriggered":
                    rail = {k: str(data.get(k, "")) for k in ("stage", "rail", "action", "reason")}
                    completion.rails.append(rail)
                    if rail["action"] == GuardAction.BLOCK.value:
                        completion.finish_reason = "content_filter"
                    yield Piece(rail=rail)
                elif event.type == "CitationAdded":
                    completion.cited.append({k: data.get(k) for k in _CITATION_FIELDS})
                elif event.type in ("RunCompleted", "RunCancelled", "RunFailed"):
                    ended = True
                    usage = data.get("usage") or {}
                    completion.reported_prompt_tokens = int(usage.get("promptTokens", 0))
                    completion.reported_completion_tokens = int(usage.get("completionTokens", 0))
                    completion.message_id = data.get("messageId")
                    if event.type == "RunFailed":
                        raise _run_failure(data)
                    completion.finish_reason = completion.finish_reason or "stop"
        finally:
            if not ended:  # the client left (or the stream broke): the run stops with it
                await asyncio.shield(self._runs.cancel(principal, run_id, wait=False))

    async def _generate(
        self, principal: Principal, completion: Completion, reservation: Reservation
    ) -> AsyncGenerator[Piece, None]:
        prompt = list(completion.prompt)
        users = [i for i, m in enumerate(prompt) if m.role == "user"]
        last = users[-1]
        # Earlier user messages are read back as the agent reads back its memory: rewritten as
        # the input rails rewrite a message (redaction), with no new decision.
        earlier = await self._guards.rewrite_history(
            principal, [prompt[i].content for i in users[:-1]]
        )
        for i, text in zip(users[:-1], earlier, strict=True):
            prompt[i] = replace(prompt[i], content=text)
        verdict = await self._guards.check_input(principal, prompt[last].content, earlier[-7:])
        for decision in verdict.decisions:
            yield Piece(rail=self._rail(completion, "input", decision))
        if verdict.blocked:
            completion.finish_reason = "content_filter"
            completion.pieces += 1
            yield Piece(text=verdict.safe_reply)
            return
        prompt[last] = replace(prompt[last], content=verdict.text)
        if completion.request.sightline.knowledge:
            async for piece in self._retrieve(principal, completion, prompt, verdict.text):
                yield piece

        tokens = self._tokens(completion, prompt)
        guarded = self._guards.check_output_stream(principal, tokens)
        uncharged = 0
        try:
            async for piece in guarded:
                rail = None
                if piece.decision is not None:
                    rail = self._rail(completion, "output", piece.decision)
                if piece.text:
                    completion.pieces += 1
                    completion.answer.append(piece.text)
                    uncharged += 1
                if piece.text or rail is not None:
                    yield Piece(text=piece.text, rail=rail)
                if uncharged >= CHARGE_EVERY:
                    uncharged = 0
                    # BudgetExceeded ends the answer
                    await self._charge(completion, reservation, CHARGE_EVERY)
                if piece.decision is not None and piece.decision.action is GuardAction.BLOCK:
                    completion.finish_reason = "content_filter"
                    break
        finally:
            await guarded.aclose()  # type: ignore[attr-defined]
            await tokens.aclose()
        completion.finish_reason = completion.finish_reason or "stop"
        await self._attribute(principal, completion)

    async def _attribute(self, principal: Principal, completion: Completion) -> None:
        """With the knowledge extra, an answer that cites none of its sources as [n] gets its
        sentences attributed to them by similarity, as a chat run's answer does."""
        similarity = self._tools.similarity
        if (
            similarity is None
            or not completion.sources
            or completion.finish_reason == "content_filter"
            or completion.citations()
        ):
            return
        completion.attributed = await attributed(
            principal,
            "".join(completion.answer),
            numbered(completion.sources),
            similarity,
            self._chat,
            what=f"completion {completion.id}",
        )

    @staticmethod
    async def _tokens(
        completion: Completion, prompt: list[ChatMessage]
    ) -> AsyncGenerator[str, None]:
        """The model's text; its finish reason and usage go on the completion."""
        model, request = completion.model, completion.request
        sampling = replace(
            model.sampling,
            temperature=(
                request.temperature
                if request.temperature is not None
                else model.sampling.temperature
            ),
            top_p=request.top_p if request.top_p is not None else model.sampling.top_p,
            seed=request.seed if request.seed is not None else model.sampling.seed,
            stop=request.stop_sequences,
        )
        completion.model_called = True
        stream = model.provider.stream(prompt, max_tokens=completion.max_tokens, sampling=sampling)
        try:
            async for chunk in stream:
                if chunk.text:
                    yield chunk.text
                if chunk.finish_reason:
                    completion.finish_reason = _FINISH.get(chunk.finish_reason, "stop")
                if chunk.completion_tokens is not None:
                    completion.reported_prompt_tokens = chunk.prompt_tokens or 0
                    completion.reported_completion_tokens = chunk.completion_tokens
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # stops the model

    async def _retrieve(
        self, principal: Principal, completion: Completion, prompt: list[ChatMessage], query: str
    ) -> AsyncGenerator[Piece, None]:
        """The knowledge base's passages for the question, screened by the retrieval rails,
        numbered into the system message as the agent puts them (data, not instructions); none
        for a question the knowledge base does not come close to."""
        search = self._tools.search_knowledge
        if search is None or not query.strip():
            return
        try:
            async with asyncio.timeout(self._chat.tool_timeout_s):
                if not await self._tools.retrieve_for(principal, query):
                    return  # no documents, or none near the question (small talk): no sources
                found = await search(principal, query, self._chat.knowledge_results)
        except (TimeoutError, AppError) as exc:  # the agent answers without sources too
            log.warning("completion %s: knowledge search failed: %r", completion.id, exc)
            return
        verdict = await self._guards.check_retrieved(principal, found)
        for decision in verdict.decisions:
            yield Piece(rail=self._rail(completion, "retrieval", decision))
        completion.sources = list(verdict.sources)
        if not completion.sources:
            return
        listed = "\n".join(
            f"[{n}] {s.title}: {s.text}" for n, s in enumerate(completion.sources, start=1)
        )
        block = f"{SOURCES_PREAMBLE}\n<sources>\n{listed}\n</sources>"
        if prompt[0].role == "system":
            prompt[0] = replace(prompt[0], content=f"{prompt[0].content}\n\n{block}")
        else:
            prompt.insert(0, ChatMessage("system", block))

    @staticmethod
    def _rail(completion: Completion, stage: str, decision: GuardDecision) -> dict[str, str]:
        rail = {
            "stage": stage,
            "rail": decision.rail,
            "action": decision.action.value,
            "reason": decision.reason,
        }
        completion.rails.append(rail)
        return rail

    async def _settle(
        self,
        principal: Principal,
        completion: Completion,
        reservation: Reservation,
        *,
        started: float,
    ) -> None:
        """Charges what the model read and wrote (never less than charged while streaming),
        gives back the rest of the hold and records the usage with its cost."""
        prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
        model = completion.model
        cost = model.cost(prompt_tokens, completion_tokens)
        if self.metrics is not None:
            self.metrics.model_spent(
                principal.tenant_id, model.alias, model.version, "chat", float(cost)
            )
        if self.drift is not None and not completion.left:  # a refusal counts: it is a signal
            self.drift.chat_turn(
                model.alias,
                model.version,
                prompt_chars=len(completion.prompt[-1].content) if completion.prompt else 0,
                answer_chars=sum(map(len, completion.answer)),
                rails=completion.rails,
            )
        if self.served is not None and completion.model_called and not completion.left:
            self.served(
                completion.model.alias,
                completion.model.version,
                ok=completion.finish_reason is not None,
                latency_s=time.perf_counter() - started,
                tokens=completion_tokens,
                cost=float(completion.model.cost(prompt_tokens, completion_tokens)),
            )
        try:
            owed = max(0, prompt_tokens + completion_tokens - int(reservation.charged))
            held: list[tuple[Reservation, float]] = [(reservation, owed)]
            if completion.money is not None:
                held.append((completion.money, max(0.0, float(cost) - completion.money.charged)))
            await self._budgets.close(held)  # the charges and the hold's rest: one round trip
            async with self._db.session(principal.tenant_id) as session:
                await reservation.settle(
                    session, cost=cost, served_by=(model.alias, model.version, "chat")
                )
        except Exception as exc:  # the answer was delivered; the hold expires with its counter
            log.warning("completion %s: usage not recorded: %r", completion.id, exc)

    async def _charge(
        self,
        completion: Completion,
        reservation: Reservation,
        tokens: int,
        money: Decimal | None = None,
    ) -> None:
        """Charges tokens, and their money (by default: as completion tokens) in the same round
        trip (as chat runs do: backend.agents.runs); a free model charges tokens alone."""
        cost = completion.model.cost(0, tokens) if money is None else money
        await self._budgets.charge_with_money(reservation, completion.money, tokens, float(cost))

    # -- embeddings ---------------------------------------------------------------------------

    @property
    def embedding_model(self) -> str:
        return self._embedder().name

    async def embed(
        self, principal: Principal, request: EmbeddingRequest
    ) -> tuple[list[list[float]], int]:
        """The knowledge base's embeddings of the texts, and the tokens they count (estimated)."""
        embedder = self._embedder()
        if request.model != embedder.name:
            raise ModelNotFound(
                f"The model {request.model!r} does not exist; embeddings come from "
                f"{embedder.name!r}.",
                model=request.model,
            )
        texts = request.texts
        if not texts or len(texts) > self._settings.max_embedding_inputs:
            raise ValidationFailed(
                f"between 1 and {self._settings.max_embedding_inputs} inputs", field="input"
            )
        if any(not t for t in texts):
            raise ValidationFailed("an input is empty", field="input")
        if any(len(t) > self._settings.max_embedding_chars for t in texts):
            raise ValidationFailed(
                f"an input is longer than {self._settings.max_embedding_chars} characters",
                field="input",
            )
        await self._limiter.enforce(principal.subject, principal.plan, "query")
        vectors, seconds = await embed_timed(embedder, texts)
        if self.embedded is not None:  # recorded, and charged (used up: BUDGET_EXCEEDED)
            await self.embedded(principal.tenant_id, seconds, principal, "openai")
        return vectors, sum(len(t) // 4 + 1 for t in texts)


_RUN_FAILURES: dict[str, type[AppError] | type[LLMError]] = {
    "BUDGET_EXCEEDED": BudgetExceeded,
    LLMUnavailable.code: LLMUnavailable,
    LLMTimeout.code: LLMTimeout,
    LLMProtocolError.code: LLMProtocolError,
    LLMError.code: LLMError,
    "SERVICE_UNAVAILABLE": ServiceUnavailable,
    "SERVER_SHUTDOWN": ServiceUnavailable,
    "WORKER_LOST": ServiceUnavailable,
}


def _run_failure(data: dict[str, Any]) -> Exception:
    """The error a failed run's RunFailed event stands for (its status and code)."""
    kind = _RUN_FAILURES.get(str(data.get("code")), InternalError)
    return kind(str(data.get("message") or "the run failed"))
