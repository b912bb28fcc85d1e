"""The rails the chat agent calls (`Guards`): fast local checks on input, retrieved chunks, the
output stream and images, under each tenant's policy; every decision is counted and audited."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from backend.agents.guards import (
    GuardAction,
    GuardDecision,
    InputVerdict,
    OutputPiece,
    RetrievalVerdict,
)
from backend.agents.tools import Source
from backend.auth import audit
from backend.auth.principal import Principal
from backend.config import ClassifierMode
from backend.core.db import Database
from backend.core.models import GuardrailPolicyRow
from backend.core.tasks import drain
from backend.errors import ValidationFailed
from backend.guardrails import content, head, selfcheck, toxicity
from backend.guardrails.classifier import TransformerClassifier, calibrated
from backend.guardrails.errors import GuardrailUnavailable
from backend.guardrails.images import ImageClassifier
from backend.guardrails.injection import InjectionDetector
from backend.guardrails.normalize import Normalised, normalise
from backend.guardrails.pii import PiiKind, find_pii, redact
from backend.guardrails.policy import GuardrailPolicy, effective, merge
from backend.guardrails.profanity import find_profanity, mask
from backend.guardrails.selfcheck import Judge
from backend.guardrails.topics import TopicMatcher
from backend.guardrails.versions import HeadVersions
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.policy import RequestKey, Route
from backend.lifecycle.router import ModelRouter
from backend.lifecycle.shadow import decision_agreement

log = logging.getLogger(__name__)


class GuardrailMetrics(Protocol):
    def guardrail_decision(self, stage: str, rail: str, action: str, tenant: str) -> None: ...

    def guardrail_latency(self, stage: str, seconds: float) -> None: ...


_AUDIT_BATCH = 200
_MAX_UNAUDITED = 10_000
_SENTENCE = re.compile(r"(?<=[.!?\n])\s+")
# the end of a sentence at the end of a text (a closing quote or bracket may follow)
_SENTENCE_END = re.compile(r"[.!?\n][\"')\]]?\s*$")
# The end of a streamed answer that may still grow into personal data: a number being written
# (card, phone, IBAN, id), or the word in progress (an e-mail address, a profane word).
_NUMBERISH_TAIL = re.compile(r"[+(]?[0-9A-Z][0-9A-Z()\-. /]*$")


@dataclass(frozen=True)
class _Unsure:
    """A message the cheap injection rails let through, for the transformer classifier."""

    text: str  # normalised
    score: float  # the cheap rails' score


class _Local(NamedTuple):
    """What the local rails leave for the model rails."""

    text: str  # the message as the model may read it (redacted)
    decisions: list[GuardDecision]
    unsure: _Unsure | None  # for the transformer classifier (None: the cheap rails settled it)
    normal: str  # the message normalised, for the learned head ("" when a length cap blocked)


@dataclass(frozen=True)
class ImageVerdict:
    nsfw: float
    decision: GuardDecision | None

    @property
    def blocked(self) -> bool:
        return self.decision is not None and self.decision.action is GuardAction.BLOCK


class GuardrailService:
    """Implements the agent's `Guards` protocol, plus policies and the image rail."""

    def __init__(
        self,
        db: Database,
        *,
        defaults: dict[str, Any] | None = None,
        detector: InjectionDetector | None = None,
        topics: TopicMatcher | None = None,
        images: ImageClassifier | None = None,
        judges: Callable[[str | None], Judge] | None = None,
        metrics: GuardrailMetrics | None = None,
        policy_cache_s: float = 10.0,
        check_timeout_s: float = 2.0,
        inline_max_chars: int = 256,
        output_hold_chars: int = 64,
        audit_timeout_s: float = 5.0,
        classifier: TransformerClassifier | None = None,
        classifier_mode: ClassifierMode = ClassifierMode.OFF,
        classifier_uncertain_score: float = 0.05,
        classifier_uncertain_chars: int = 160,
        classifier_fail_open: bool = False,
        content_pieces: int = 12,
    ) -> None:
        self._db = db
        self._defaults = GuardrailPolicy.model_validate(defaults or {}).model_dump(mode="json")
        self._detector = detector or InjectionDetector()
        self._topics = topics
        self._images = images
        self._judges = judges  # model alias -> the self-check judge on that model
        self._metrics = metrics
        self._policy_cache_s = policy_cache_s
        self._cache: dict[uuid.UUID, tuple[float, GuardrailPolicy]] = {}
        self._timeout_s = check_timeout_s
        self._inline_chars = inline_max_chars
        self._hold = output_hold_chars
        self._audit_timeout_s = audit_timeout_s
        self._classifier = classifier if classifier_mode is not ClassifierMode.OFF else None
        self._classifier_mode = classifier_mode
        self._uncertain_score = classifier_uncertain_score
        self._uncertain_chars = classifier_uncertain_chars
        self._classifier_fail_open = classifier_fail_open
        self._content_pieces = content_pieces
        # the learned head's versions, and (set by the app) the registry's router over them and
        # the model operations that record their figures and run their shadows
        self.heads = HeadVersions(head.AttackHead.load(), servable=self._reads_our_vectors)
        self.router: ModelRouter | None = None
        self.operations: ModelOperations | None = None
        # Decisions wait here for one writer task that records them in batches (one
        # transaction per tenant per batch), so a burst of redactions costs few round trips.
        self._unaudited: list[tuple[Principal, str, GuardDecision]] = []
        self._auditor: asyncio.Task[None] | None = None

    def _reads_our_vectors(self, model: head.AttackHead) -> bool:
        """Whether a head reads the vectors of the embedder the rails use (none set: it cannot
        be told here, and the learned rail refuses to run at all)."""
        return self._topics is None or model.reads(self._topics.model_name)

    async def warm(self) -> None:
        """Loads the rails' models before the first message needs them (off the event loop)."""
        for step in self.warm_ups().values():
            await step()

    def warm_ups(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Each rail model's load and first run, by name (startup runs them in the background):
        the injection classifier, the topic rail's embedder and the default policy's topic
        vectors, the image classifier."""
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "injection classifier": lambda: asyncio.to_thread(self._detector.warm),
            "toxicity classifier": lambda: asyncio.to_thread(toxicity.warm),
        }
        if (classifier := self._classifier) is not None:
            steps["injection transformer"] = classifier.warm
        if (topics := self._topics) is not None:
            rail = GuardrailPolicy.model_validate(self._defaults).topics
            steps["topic rail"] = lambda: topics.warm([*rail.allowed, *rail.denied])
        if (images := self._images) is not None:
            steps["image rail"] = images.warm
        return steps

    async def flush(self) -> None:
        """Waits until every decision so far is in the audit log."""
        while self._auditor is not None and not self._auditor.done():
            await asyncio.shield(self._auditor)

    async def close(self, grace_s: float = 5.0) -> None:
        if self._auditor is not None:
            await drain([self._auditor], grace_s)
        if self._classifier is not None:
            await self._classifier.close()

    # -- policies ---------------------------------------------------------------------------

    async def policy(self, principal: Principal) -> GuardrailPolicy:
        cached = self._cache.get(principal.tenant_id)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        async with self._db.session(principal.tenant_id) as session:
            row = await session.scalar(
                select(GuardrailPolicyRow.policy).where(
                    GuardrailPolicyRow.tenant_id == principal.tenant_id
                )
            )
        try:
            policy = effective(self._defaults, row)
        except ValidationError:  # a stored policy the current code no longer accepts
            log.exception("stored guardrail policy of tenant %s is invalid", principal.tenant_id)
            policy = effective(self._defaults, None)
        self._cache[principal.tenant_id] = (now + self._policy_cache_s, policy)
        return policy

    async def update_policy(
        self, principal: Principal, change: dict[str, Any], *, replace: bool = False
    ) -> GuardrailPolicy:
        """Merges `change` into the tenant's stored policy (or replaces it) after validating."""
        async with self._db.session(principal.tenant_id) as session:
            stored = await session.scalar(
                select(GuardrailPolicyRow.policy)
                .where(GuardrailPolicyRow.tenant_id == principal.tenant_id)
                .with_for_update()
            )
            document = change if replace else merge(stored or {}, change)
            try:
                policy = effective(self._defaults, document)
            except ValidationError as exc:
                raise ValidationFailed.listing("invalid guardrail policy", exc) from exc
            await session.execute(
                insert(GuardrailPolicyRow)
                .values(
                    tenant_id=principal.tenant_id, policy=document, updated_by=principal.user_id
                )
                .on_conflict_do_update(
                    index_elements=[GuardrailPolicyRow.tenant_id],
                    set_={"policy": document, "updated_by": principal.user_id},
                )
            )
            await audit.record(
                session,
                "guardrails.policy_updated",
                audit.Outcome.SUCCESS,
                tenant_id=principal.tenant_id,
                actor_id=principal.user_id,
                change=change,
                replace=replace or None,
            )
        self._cache[principal.tenant_id] = (time.monotonic() + self._policy_cache_s, policy)
        return policy

    # -- input --------------------------------------------------------------------------------

    async def check_input(
        self, principal: Principal, text: str, history: list[str]
    ) -> InputVerdict:
        started = time.perf_counter()
        try:
            policy = await self.policy(principal)
            async with asyncio.timeout(self._timeout_s):
                text, decisions, unsure, normal = await self._local_rails(policy, text, history)
                decisions += await self._model_rails(
                    principal, policy, text, decisions, unsure, normal
                )
        except TimeoutError as exc:
            raise GuardrailUnavailable("the input rails took too long") from exc
        except GuardrailUnavailable:
            raise
        except Exception as exc:  # fail closed: an input rail that breaks blocks the message
            log.exception("input rails failed")
            raise GuardrailUnavailable("the input rails failed") from exc
        self._decided(principal, "input", decisions, time.perf_counter() - started)
        return InputVerdict(text=text, decisions=tuple(decisions), safe_reply=policy.safe_reply)

    async def _local_rails(self, policy: GuardrailPolicy, text: str, history: list[str]) -> _Local:
        """The local rails: on the event loop for a short message, where they take less time
        than a thread's handoff (which was most of the input rails' time on a busy machine),
        in a thread for a longer one (their time grows with the text they read: the message
        and the recent turns the injection rail reads with it)."""
        rail = policy.injection
        read = history[-rail.history_turns :] if rail.enabled and rail.history_turns else []
        if len(text) + sum(len(turn) for turn in read) <= self._inline_chars:
            return self._input_rails(policy, text, history)
        return await asyncio.to_thread(self._input_rails, policy, text, history)

    def _input_rails(self, policy: GuardrailPolicy, text: str, history: list[str]) -> _Local:
        """The local rails (see _local_rails for where they run)."""
        decisions: list[GuardDecision] = []
        if policy.length.enabled and len(text) > policy.length.max_chars:
            decisions.append(
                GuardDecision(
                    "length", GuardAction.BLOCK, f"message over {policy.length.max_chars} chars"
                )
            )
            return _Local(text, decisions, None, "")
        normal = normalise(text)
        injection, unsure = self._injection_rail(policy, normal, text, history)
        if injection is not None:
            decisions.append(injection)
            if injection.action is GuardAction.BLOCK:
                return _Local(text, decisions, None, normal.text)
        if policy.pii.enabled and (matches := find_pii(text, policy.pii.kinds)):
            action = policy.pii.input_action
            kinds = ", ".join(sorted({m.kind.value for m in matches}))
            decisions.append(GuardDecision("pii", action, kinds))
            if action is GuardAction.BLOCK:
                return _Local(text, decisions, None, normal.text)
            if action is GuardAction.REDACT:
                text = redact(text, matches)
        if policy.profanity.enabled and (spans := find_profanity(normal.text)):
            action = policy.profanity.input_action
            decisions.append(GuardDecision("profanity", action, f"{len(spans)} word(s)"))
            if action is GuardAction.REDACT:
                text = mask(text, find_profanity(text))
        rail = policy.toxicity
        if rail.enabled and (score := toxicity.score(normal.text)) >= rail.threshold:
            decisions.append(GuardDecision("toxicity", rail.action, f"score {score:.2f}"))
        return _Local(text, decisions, unsure, normal.text)

    def _injection_rail(
        self, policy: GuardrailPolicy, normal: Normalised, text: str, history: list[str]
    ) -> tuple[GuardDecision | None, _Unsure | None]:
        rail = policy.injection
        if not rail.enabled:
            return None, None
        decision, score = self._cheap_injection(policy, normal, text, history)
        if decision is not None or self._classifier is None:
            return decision, None
        if self._classifier_mode is ClassifierMode.UNCERTAIN and (
            score < self._uncertain_score and len(normal.text) < self._uncertain_chars
        ):
            return None, None  # settled: short, and nothing attack-like in it
        return None, _Unsure(normal.text, score)

    def _cheap_injection(
        self, policy: GuardrailPolicy, normal: Normalised, text: str, history: list[str]
    ) -> tuple[GuardDecision | None, float]:
        """The signatures and the TF-IDF classifier: their decision, and the message's score."""
        rail = policy.injection
        found = self._detector.score(normal)
        own = found.score
        if found.score < rail.threshold and rail.history_turns and history:
            # an attack split across turns: the recent turns read together score, though no
            # turn does alone (an earlier attack was handled when it came)
            recent = history[-rail.history_turns :]
            split = self._detector.score(normalise(" ".join([*recent, text])))
            if split.score >= rail.threshold and all(
                self._detector.score(normalise(turn)).score < rail.threshold for turn in recent
            ):
                found = split
        if found.score < rail.threshold:
            return None, own
        how = f" ({', '.join(sorted(normal.signals))})" if normal.signals else ""
        reason = f"{found.source} {found.score:.2f}{how}"
        return GuardDecision("injection", rail.action, reason), own

    async def _model_rails(  # noqa: PLR0917 (the local rails' result, unpacked)
        self,
        principal: Principal,
        policy: GuardrailPolicy,
        text: str,
        so_far: list[GuardDecision],
        unsure: _Unsure | None,
        normal: str,
    ) -> list[GuardDecision]:
        """The rails that need a model (the injection classifier, content, topics,
        self-check), in that order until one blocks, unless a local one blocked."""
        if any(d.action is GuardAction.BLOCK for d in so_far):
            return []
        found: list[GuardDecision] = []
        if unsure is not None and (classified := await self._classifier_rail(policy, unsure)):
            if classified.action is GuardAction.BLOCK:
                return [classified]
            found.append(classified)
        learned = await self._learned_rail(principal, policy, normal)
        if learned is not None:
            return [*found, learned]
        harmful = await self._content_rail(policy, text)
        if harmful is not None:
            return [*found, harmful]
        topic = await self._topic_rail(policy, text)
        if topic is not None:
            return [*found, topic]
        judged = await self._self_check(policy, text)
        return [*found, judged] if judged is not None else found

    async def _classifier_rail(
        self, policy: GuardrailPolicy, unsure: _Unsure
    ) -> GuardDecision | None:
        """The transformer classifier, in its worker, ensembled with the cheap score."""
        assert self._classifier is not None
        rail = policy.injection
        try:
            [probability] = await self._classifier.probabilities([unsure.text])
        except GuardrailUnavailable as exc:
            if not self._classifier_fail_open:
                raise
            log.warning("injection classifier unavailable, failing open: %s", exc)
            return GuardDecision("injection", GuardAction.WARN, f"classifier unavailable: {exc}")
        score = calibrated(unsure.score, probability, len(unsure.text))
        if score < rail.classifier_threshold:
            return None
        return GuardDecision(
            "injection", rail.action, f"classifier {score:.2f} (transformer {probability:.2f})"
        )

    async def _learned_rail(
        self, principal: Principal, policy: GuardrailPolicy, normal: str
    ) -> GuardDecision | None:
        """The learned attack head on the normalised message's MiniLM vectors, with the version
        the registry routes this caller to. Where the policy mirrors this message to a shadow
        version, the shadow scores the same vectors after this returns; its decision is only
        compared with this one's (modelComparison), never acted on."""
        rail = policy.injection
        if not (rail.enabled and rail.learned):
            return None
        if self._topics is None:
            raise GuardrailUnavailable("the learned injection score is on but no embedder is set")
        route = self._head_route(principal)
        routed = self.heads.get(route.version) if route is not None else None
        if route is not None and routed is not None:
            version, model = route.version, routed
        else:  # no router, or it could not say: this replica's best version
            route = None
            version, model = self.heads.default
        if not model.reads(self._topics.model_name):
            raise GuardrailUnavailable(
                f"the learned injection score reads {model.embedding_model} vectors, "
                f"not {self._topics.model_name}'s"
            )
        started = time.perf_counter()
        try:
            vectors = await self._topics.embed(head.windows(normal))
            score = model.probability(vectors)
        except Exception:
            self._served(version, ok=False, started=started)
            raise
        took = self._served(version, ok=True, started=started)
        flagged = score >= _threshold(rail.learned_threshold, model)
        if route is not None and route.shadow is not None and self.operations is not None:
            self._shadow_head(
                route, rail.learned_threshold, self._topics.model_name, vectors, flagged, took
            )
        if not flagged:
            return None
        return GuardDecision(
            "injection", rail.action, f"learned score {score:.2f} ({self.heads.model}@{version})"
        )

    def _head_route(self, principal: Principal) -> Route | None:
        """The head version for this caller (a tenant's pin, else the policy's split by user,
        with a shadow for sampled messages); None without a router or when it cannot say."""
        if self.router is None:
            return None
        key = RequestKey(
            tenant_id=str(principal.tenant_id),
            user_id=str(principal.user_id) if principal.user_id else None,
            request_id=uuid.uuid4().hex,
        )
        try:
            return self.router.route(self.heads.model, key)
        except ValidationFailed as exc:  # no version here: the packaged head serves
            log.warning("routing %s failed, the default serves: %s", self.heads.model, exc)
            return None

    def _served(self, version: str, *, ok: bool, started: float) -> float:
        """Records a head version's scoring (the embedding and the dot product) in the serving
        figures; returns how long it took."""
        took = time.perf_counter() - started
        if self.operations is not None:
            self.operations.stats.record(self.heads.model, version, ok=ok, latency_s=took)
        return took

    def _shadow_head(  # noqa: PLR0917 (the live decision's parts)
        self,
        route: Route,
        tenant_threshold: float | None,
        embedder: str | None,
        vectors: list[list[float]],
        live_flagged: bool,
        live_s: float,
    ) -> None:
        """Scores the same vectors with the shadow version, off this message's path."""
        assert self.operations is not None
        assert route.shadow is not None
        shadow = self.heads.get(route.shadow)
        if shadow is None or not shadow.reads(embedder) or len(shadow.weights) != len(vectors[0]):
            return  # not built here (the router checks), or for other vectors: nothing to compare

        async def run() -> bool:
            return shadow.probability(vectors) >= _threshold(tenant_threshold, shadow)

        self.operations.mirror(route, live_flagged, live_s, run, decision_agreement)

    async def _content_rail(self, policy: GuardrailPolicy, text: str) -> GuardDecision | None:
        rail = policy.content
        match = await self.content_match(policy, text)
        if match is None or match.similarity < rail.threshold:
            return None
        return GuardDecision(
            "content", rail.action, f"{match.category} (similarity {match.similarity:.2f})"
        )

    async def content_match(
        self, policy: GuardrailPolicy, text: str, *, on_output: bool = False
    ) -> content.ContentMatch | None:
        """The sentence of `text` nearest a harmful example of the tenant's categories (and
        nearer it than any harmless one by the rail's margin), whatever the threshold. The
        input's rail is `content.enabled`; the answer's, `output.content` (same categories)."""
        rail = policy.content
        if not (policy.output.content if on_output else rail.enabled) or self._topics is None:
            return None
        labelled = content.examples(rail.categories, rail.custom)
        parts = content.pieces(text, self._content_pieces)
        if not labelled or not parts:
            return None
        harmful = [e for _, e in labelled]
        sims = await self._topics.similarities(parts, [*harmful, *content.HARMLESS])
        return content.strongest(sims, [c for c, _ in labelled], rail.margin)

    async def _self_check(self, policy: GuardrailPolicy, text: str) -> GuardDecision | None:
        rail = policy.self_check
        if not rail.enabled:
            return None
        if self._judges is None:
            raise GuardrailUnavailable("the self-check rail is on but no model is configured")
        answer = await self._judges(rail.model)(selfcheck.prompt(text))
        if not selfcheck.refused(answer):
            return None
        return GuardDecision("self_check", rail.action, "the model judged the message unsafe")

    async def _topic_rail(self, policy: GuardrailPolicy, text: str) -> GuardDecision | None:
        rail = policy.topics
        if not rail.enabled or self._topics is None or not (rail.allowed or rail.denied):
            return None
        match = await self._topics.match(text, rail.allowed, rail.denied, rail.threshold)
        if match.denied is not None:
            return GuardDecision("topic", rail.action, f"denied topic: {match.denied}")
        if match.off_topic:
            return GuardDecision(
                "topic", rail.action, f"off topic (similarity {match.best_allowed:.2f})"
            )
        return None

    async def rewrite_history(self, principal: Principal, texts: list[str]) -> list[str]:
        """Earlier user messages rebuilt into the agent's memory, with the personal data and
        profanity that the tenant's input rails take out of a message taken out. No decision is
        recorded: each was recorded when its message came."""
        if not texts:
            return texts
        policy = await self.policy(principal)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.to_thread(_rewritten, policy, texts)
        except TimeoutError as exc:  # fail closed, as the input rails do
            raise GuardrailUnavailable("rewriting the earlier messages took too long") from exc

    async def redact(self, principal: Principal, text: str, stage: str) -> str:
        """Personal data out of a text headed for the prompt from elsewhere than the user (the
        OCR text of an attached image), under the tenant's PII policy."""
        policy = await self.policy(principal)
        rail = policy.pii
        if not rail.enabled or rail.input_action is GuardAction.WARN:
            return text
        return await self._redacted(principal, text, rail.kinds, stage)

    async def redact_for_storage(self, principal: Principal, text: str) -> str:
        """A user's message as stored under a policy that stores messages redacted: the
        personal data of the kinds the tenant's PII rail looks for replaced, whatever the
        rail's actions (what is kept is the tenant's data protection choice)."""
        policy = await self.policy(principal)
        return await self._redacted(principal, text, policy.pii.kinds, "storage")

    async def _redacted(
        self, principal: Principal, text: str, kinds: list[PiiKind], stage: str
    ) -> str:
        if not text:
            return text
        matches = await asyncio.to_thread(find_pii, text, kinds)
        if not matches:
            return text
        found = ", ".join(sorted({m.kind.value for m in matches}))
        self._decided(principal, stage, [GuardDecision("pii", GuardAction.REDACT, found)], None)
        return redact(text, matches)

    # -- retrieved chunks ----------------------------------------------------------------------

    async def check_retrieved(
        self, principal: Principal, sources: list[Source]
    ) -> RetrievalVerdict:
        policy = await self.policy(principal)
        if not policy.retrieval.enabled or not sources:
            return RetrievalVerdict(sources=sources)
        started = time.perf_counter()
        kept, decisions = await asyncio.to_thread(self._retrieval_rail, policy, sources)
        self._decided(principal, "retrieval", decisions, time.perf_counter() - started)
        return RetrievalVerdict(sources=kept, decisions=tuple(decisions))

    def _retrieval_rail(
        self, policy: GuardrailPolicy, sources: list[Source]
    ) -> tuple[list[Source], list[GuardDecision]]:
        rail = policy.retrieval
        kept: list[Source] = []
        decisions: list[GuardDecision] = []
        for source in sources:
            if self._detector.score(normalise(source.text), document=True).score < rail.threshold:
                kept.append(source)
                continue
            where = f"chunk {source.chunk_id} of {source.title!r}"
            if rail.action is GuardAction.BLOCK:
                decisions.append(
                    GuardDecision("retrieval_injection", rail.action, f"{where} dropped")
                )
                continue
            # neutralise: keep the passage's sentences that carry no instruction to the model
            sentences = _SENTENCE.split(source.text)
            clean = [
                s
                for s in sentences
                if self._detector.score(normalise(s), document=True).score < rail.threshold
            ]
            removed = len(sentences) - len(clean)
            text = " ".join(clean) if clean else ""
            if text:
                text += f" [{removed} sentence(s) addressed to the assistant removed]"
                kept.append(
                    Source(
                        chunk_id=source.chunk_id,
                        document_id=source.document_id,
                        title=source.title,
                        text=text,
                        score=source.score,
                        span=source.span,
                    )
                )
            decisions.append(
                GuardDecision(
                    "retrieval_injection",
                    rail.action if text else GuardAction.BLOCK,
                    f"{where}: {removed} sentence(s) removed" if text else f"{where} dropped",
                )
            )
        return kept, decisions

    # -- output stream -------------------------------------------------------------------------

    async def check_output_stream(
        self, principal: Principal, tokens: AsyncIterator[str]
    ) -> AsyncIterator[OutputPiece]:
        """Streams the answer through PII redaction and the profanity rail. Text that may still
        grow into personal data (a number being written, the word in progress) is held back
        until it is complete, at most `output_hold_chars`."""
        policy = await self.policy(principal)
        if not policy.output.enabled:
            async for token in tokens:
                yield OutputPiece(token)
            return
        pieces = self._output_pieces(principal, policy, tokens)
        if policy.output.content or policy.output.self_check or policy.output.toxicity:
            pieces = self._checked_in_chunks(principal, policy, pieces)
        async with contextlib.aclosing(pieces):  # the engine's stream closes with this one
            async for piece in pieces:
                yield piece

    async def _output_pieces(
        self, principal: Principal, policy: GuardrailPolicy, tokens: AsyncIterator[str]
    ) -> AsyncIterator[OutputPiece]:
        """The engine's output rails on the answer as it streams (the NeMo engine has its own)."""
        async for piece, decision in self._screened(principal, policy, tokens):
            yield OutputPiece(piece, decision)

    async def _checked_in_chunks(
        self, principal: Principal, policy: GuardrailPolicy, pieces: AsyncIterator[OutputPiece]
    ) -> AsyncIterator[OutputPiece]:
        """The output rails' pieces held back and released a chunk at a time (about
        `chunk_chars`, ending a sentence), each once the model rails passed it; a chunk they
        block is dropped and the answer ends with the safe reply."""
        rail = policy.output
        held: list[OutputPiece] = []
        text = before = ""
        async with contextlib.aclosing(pieces):
            async for piece in _then_end(pieces):
                if piece is not None:  # None: the answer ended, what is held goes now
                    if piece.decision is not None and piece.decision.action is GuardAction.BLOCK:
                        yield piece  # an earlier rail ended it: what is held is never sent
                        return
                    held.append(piece)
                    text += piece.text
                    full = len(text) >= rail.chunk_chars and (
                        _SENTENCE_END.search(text) is not None or len(text) >= 2 * rail.chunk_chars
                    )
                    if not full:
                        continue
                elif not held:
                    return
                blocked = await self._chunk_verdict(principal, policy, before, text)
                if blocked is not None:
                    yield OutputPiece("\n\n" + policy.safe_reply, blocked)
                    return
                for released in held:
                    yield released
                before = (before + text)[-rail.context_chars :] if rail.context_chars else ""
                held, text = [], ""

    async def _chunk_verdict(
        self, principal: Principal, policy: GuardrailPolicy, before: str, chunk: str
    ) -> GuardDecision | None:
        """A BLOCK when the content rail, the toxicity classifier or the self-check finds the chunk
        harmful, or when they
        cannot tell in time (fail closed, as the input rails do); None: it may go out."""
        rail = policy.output
        started = time.perf_counter()
        decision: GuardDecision | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if rail.content:
                    match = await self.content_match(policy, chunk, on_output=True)
                    if match is not None and match.similarity >= policy.content.threshold:
                        reason = f"{match.category} (similarity {match.similarity:.2f})"
                        decision = GuardDecision("content", GuardAction.BLOCK, reason)
                if decision is None and rail.toxicity:
                    score = await asyncio.to_thread(toxicity.score, chunk)
                    if score >= policy.toxicity.threshold:
                        reason = f"score {score:.2f}"
                        decision = GuardDecision("toxicity", GuardAction.BLOCK, reason)
                if decision is None and rail.self_check:
                    if self._judges is None:
                        raise GuardrailUnavailable("the output self-check has no model")
                    judge = self._judges(policy.self_check.model)
                    if selfcheck.refused(await judge(selfcheck.answer_prompt(before, chunk))):
                        reason = "the model judged the answer unsafe"
                        decision = GuardDecision("self_check", GuardAction.BLOCK, reason)
        except (TimeoutError, GuardrailUnavailable) as exc:
            reason = f"the answer could not be checked: {exc or 'timed out'}"
            decision = GuardDecision("output_check", GuardAction.BLOCK, reason)
        self._decided(
            principal, "output", [decision] if decision else [], time.perf_counter() - started
        )
        return decision

    async def _screened(
        self, principal: Principal, policy: GuardrailPolicy, tokens: AsyncIterator[str]
    ) -> AsyncIterator[tuple[str, GuardDecision | None]]:
        """The answer in screened pieces, each with the decision taken on it; ends after a
        BLOCK."""
        pending = ""
        reported: set[str] = set()
        async for token in tokens:
            pending += token
            cut = self._safe_cut(pending)
            if cut <= 0:
                continue
            piece, used, decision = self._screen(principal, policy, pending, cut, reported)
            pending = pending[used:]
            yield piece, decision
            if decision is not None and decision.action is GuardAction.BLOCK:
                return
        if pending:
            piece, _, decision = self._screen(principal, policy, pending, len(pending), reported)
            yield piece, decision

    def _safe_cut(self, pending: str) -> int:
        """How much of `pending` can go out now."""
        last_space = max(pending.rfind(" "), pending.rfind("\n"))
        cut = last_space + 1 if last_space >= 0 else 0
        tail = _NUMBERISH_TAIL.search(pending[:cut].rstrip())
        if tail is not None and any(ch.isdigit() for ch in tail.group(0)):
            cut = tail.start()
        if len(pending) - cut > self._hold:  # never hold more than this
            cut = len(pending) - self._hold
        return cut

    def _screen(
        self,
        principal: Principal,
        policy: GuardrailPolicy,
        pending: str,
        cut: int,
        reported: set[str],
    ) -> tuple[str, int, GuardDecision | None]:
        """The first `cut` characters of `pending`, screened (a match that straddles the cut is
        taken whole), and how many characters of `pending` that used."""
        decision: GuardDecision | None = None
        piece = pending[:cut]
        if policy.pii.enabled:
            matches = [m for m in find_pii(pending, policy.pii.kinds) if m.start < cut]
            if matches:
                action = policy.pii.output_action
                kinds = ", ".join(sorted({m.kind.value for m in matches}))
                decision = GuardDecision("pii", action, kinds)
                if action is GuardAction.BLOCK:
                    return "\n\n" + policy.safe_reply, cut, self._once(principal, decision, None)
                if action is GuardAction.REDACT:
                    cut = max(cut, matches[-1].end)
                    piece = redact(pending[:cut], matches)
        if policy.profanity.enabled:
            spans = find_profanity(piece)
            if spans:
                action = policy.profanity.output_action
                found = GuardDecision("profanity", action, f"{len(spans)} word(s)")
                if action is GuardAction.BLOCK:
                    return "\n\n" + policy.safe_reply, cut, self._once(principal, found, None)
                if action is GuardAction.REDACT:
                    piece = mask(piece, spans)
                decision = decision or found
        return piece, cut, self._once(principal, decision, reported)

    def _once(
        self, principal: Principal, decision: GuardDecision | None, reported: set[str] | None
    ) -> GuardDecision | None:
        """Reports each (rail, reason) once per answer; a block always."""
        if decision is None:
            return None
        key = f"{decision.rail}:{decision.reason}"
        if reported is not None:
            if key in reported:
                return None
            reported.add(key)
        self._decided(principal, "output", [decision], None)
        return decision

    # -- images --------------------------------------------------------------------------------

    async def check_image(self, principal: Principal, data: bytes) -> ImageVerdict:
        policy = await self.policy(principal)
        if not policy.image.enabled or self._images is None:
            return ImageVerdict(nsfw=0.0, decision=None)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s * 5):
                score = await self._images.nsfw_probability(data)
        except TimeoutError as exc:
            raise GuardrailUnavailable("the image rail took too long") from exc
        decision = None
        if score >= policy.image.threshold:
            decision = GuardDecision("nsfw_image", policy.image.action, f"score {score:.2f}")
        self._decided(
            principal, "image", [decision] if decision else [], time.perf_counter() - started
        )
        return ImageVerdict(nsfw=score, decision=decision)

    # -- decisions ----------------------------------------------------------------------------

    def _decided(
        self,
        principal: Principal,
        stage: str,
        decisions: list[GuardDecision],
        seconds: float | None,
    ) -> None:
        if self._metrics is not None:
            if seconds is not None:
                self._metrics.guardrail_latency(stage, seconds)
            for d in decisions:
                self._metrics.guardrail_decision(
                    stage, d.rail, d.action.value, str(principal.tenant_id)
                )
        if not decisions:
            return
        room = _MAX_UNAUDITED - len(self._unaudited)
        if room < len(decisions):
            log.warning("audit backlog full: %d guardrail decisions not audited", len(decisions))
        self._unaudited += [(principal, stage, d) for d in decisions[: max(room, 0)]]
        if self._auditor is None or self._auditor.done():
            self._auditor = asyncio.create_task(self._audit(), name="guardrail-audit")

    async def _audit(self) -> None:
        while self._unaudited:
            batch, self._unaudited = self._unaudited[:_AUDIT_BATCH], self._unaudited[_AUDIT_BATCH:]
            tenants: dict[uuid.UUID, list[tuple[Principal, str, GuardDecision]]] = {}
            for entry in batch:
                tenants.setdefault(entry[0].tenant_id, []).append(entry)
            for tenant_id, entries in tenants.items():
                try:
                    async with asyncio.timeout(self._audit_timeout_s):
                        async with self._db.session(tenant_id) as session:
                            for principal, stage, d in entries:
                                await audit.record(
                                    session,
                                    f"guardrails.{stage}.{d.rail}",
                                    audit.Outcome.DENIED
                                    if d.action is GuardAction.BLOCK
                                    else audit.Outcome.SUCCESS,
                                    tenant_id=tenant_id,
                                    actor_id=principal.user_id,
                                    action=d.action.value,
                                    reason=d.reason,
                                )
                except Exception:  # the audit trail must not break the chat; metrics still count
                    log.exception("could not record %d guardrail decisions", len(entries))


def _threshold(tenant: float | None, model: head.AttackHead) -> float:
    """The tenant's threshold when it set one, else the head version's own."""
    return model.threshold if tenant is None else tenant


def _rewritten(policy: GuardrailPolicy, texts: list[str]) -> list[str]:
    """`texts` as the input rails leave a message: personal data redacted and profanity masked
    where the tenant's policy takes them out (a message blocked for them is redacted too)."""
    pii, profanity = policy.pii, policy.profanity

    def rewritten(text: str) -> str:
        if pii.enabled and pii.input_action is not GuardAction.WARN:
            text = redact(text, find_pii(text, pii.kinds))
        if profanity.enabled and profanity.input_action is not GuardAction.WARN:
            text = mask(text, find_profanity(text))
        return text

    return [rewritten(text) for text in texts]


async def _then_end(pieces: AsyncIterator[OutputPiece]) -> AsyncIterator[OutputPiece | None]:
    """`pieces`, then None once they have ended."""
    async for piece in pieces:
        yield piece
    yield None
