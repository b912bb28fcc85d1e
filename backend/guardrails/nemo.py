"""The `nemo` engine: Sightline's rails run as actions of the NeMo Guardrails flows in
`backend/guardrails/config` (input rails through `generate_async`, output rails through NeMo's
streaming output rails), with the packaged MiniLM registered as NeMo's embedding provider.

Redaction of the streamed answer stays ahead of NeMo (its streaming rails can block a chunk but
not rewrite it): personal data is masked first, then NeMo checks each chunk before it goes out.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from nemoguardrails import LLMRails, RailsConfig
from nemoguardrails.actions.rail_outcome import RailDecision, RailOutcome
from nemoguardrails.embeddings.providers import register_embedding_provider
from nemoguardrails.embeddings.providers.base import EmbeddingModel

from backend.agents.guards import GuardAction, GuardDecision, InputVerdict, OutputPiece
from backend.auth.principal import Principal
from backend.core.db import Database
from backend.guardrails.errors import GuardrailUnavailable
from backend.guardrails.pii import find_pii
from backend.guardrails.policy import GuardrailPolicy
from backend.guardrails.profanity import find_profanity
from backend.guardrails.service import GuardrailService
from backend.guardrails.topics import TextEmbedder

ENGINE = "sightline"
_EMBEDDERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


class SightlineEmbeddings(EmbeddingModel):
    """NeMo's view of our embedder (the packaged all-MiniLM-L6-v2 unless configured)."""

    engine_name = ENGINE

    def __init__(self, embedding_model: str, instance: str = "", **_: Any) -> None:
        self.model = embedding_model
        self._instance = instance

    async def encode_async(self, documents: list[str]) -> list[list[float]]:
        embedder = _EMBEDDERS.get(self._instance)
        if embedder is None:
            raise RuntimeError("no embedder registered for NeMo Guardrails")
        return await embedder.embed(documents)

    def encode(self, documents: list[str]) -> list[list[float]]:
        raise NotImplementedError("Sightline's embeddings are asynchronous: use encode_async")


register_embedding_provider(SightlineEmbeddings, ENGINE)


def load_config(instance: str) -> RailsConfig:
    """The packaged config, its embedding model bound to this engine's embedder."""
    folder = files("backend.guardrails") / "config"
    config = RailsConfig.from_content(
        yaml_content=(folder / "config.yml").read_text("utf-8"),
        colang_content=(folder / "rails.co").read_text("utf-8"),
    )
    for model in config.models:
        if model.type == "embeddings" and model.engine == ENGINE:
            model.parameters = {**model.parameters, "instance": instance}
    return config


@dataclass
class _Call:
    """One rails call in flight: what the actions need and what they decided."""

    principal: Principal
    policy: GuardrailPolicy
    history: list[str] = field(default_factory=list)
    text: str = ""
    decisions: list[GuardDecision] = field(default_factory=list)
    checked: bool = False  # the input action ran to the end


class NemoGuardrailService(GuardrailService):
    def __init__(
        self, db: Database, *, embedder: TextEmbedder | None = None, **options: Any
    ) -> None:
        super().__init__(db, **options)
        self._instance = uuid.uuid4().hex
        if embedder is not None:
            _EMBEDDERS[self._instance] = embedder
        self._embedder = embedder  # keeps the weak registry entry alive
        self._calls: dict[str, _Call] = {}
        self._rails = LLMRails(load_config(self._instance))
        self._rails.register_action(self._check_input_action, "sightline_check_input")
        self._rails.register_action(self._check_output_action, "sightline_check_output")

    @property
    def embedding_params(self) -> dict[str, str]:
        """What NeMo's embedding indexes pass to reach this engine's embedder."""
        return {"instance": self._instance}

    def _context(self, call: _Call) -> tuple[str, dict[str, Any]]:
        key = uuid.uuid4().hex
        self._calls[key] = call
        return key, {"role": "context", "content": {"sightline_call": key}}

    def _call_of(self, context: dict[str, Any] | None) -> _Call:
        key = (context or {}).get("sightline_call")
        call = self._calls.get(str(key))
        if call is None:
            raise RuntimeError("rails action called outside a Sightline call")
        return call

    # -- input --------------------------------------------------------------------------------

    async def check_input(
        self, principal: Principal, text: str, history: list[str]
    ) -> InputVerdict:
        policy = await self.policy(principal)
        call = _Call(principal, policy, history, text)
        key, context = self._context(call)
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._rails.generate_async(
                    messages=[context, {"role": "user", "content": text}],
                    options={"rails": ["input"]},
                )
        except TimeoutError as exc:
            raise GuardrailUnavailable("the input rails took too long") from exc
        except Exception as exc:  # fail closed
            raise GuardrailUnavailable("the input rails failed") from exc
        finally:
            self._calls.pop(key, None)
        if not call.checked:  # NeMo swallowed an action's exception: fail closed all the same
            raise GuardrailUnavailable("an input rail failed")
        self._decided(
            principal, "input", call.decisions, asyncio.get_running_loop().time() - started
        )
        return InputVerdict(
            text=call.text, decisions=tuple(call.decisions), safe_reply=policy.safe_reply
        )

    async def _check_input_action(self, context: dict[str, Any] | None = None, **_: Any) -> dict:
        call = self._call_of(context)
        text, decisions, unsure, normal = await self._local_rails(
            call.policy, call.text, call.history
        )
        decisions += await self._model_rails(
            call.principal, call.policy, text, decisions, unsure, normal
        )
        call.text = text
        call.decisions = decisions
        call.checked = True
        blocked = any(d.action is GuardAction.BLOCK for d in decisions)
        return {"blocked": blocked, "text": text}

    # -- output stream -------------------------------------------------------------------------

    async def _output_pieces(
        self, principal: Principal, policy: GuardrailPolicy, tokens: AsyncIterator[str]
    ) -> AsyncIterator[OutputPiece]:
        call = _Call(principal, policy)
        key, context = self._context(call)
        redacted = self._masked(principal, policy, tokens, call)
        stream = self._rails.stream_async(
            messages=[context, {"role": "user", "content": ""}], generator=redacted
        )
        try:
            async for chunk in stream:
                text = chunk if isinstance(chunk, str) else ""
                error = _error_of(text)
                if error is not None:
                    blocked = next(
                        (d for d in call.decisions if d.action is GuardAction.BLOCK),
                        GuardDecision("output", GuardAction.BLOCK, error),
                    )
                    self._decided(principal, "output", [blocked], None)
                    yield OutputPiece("\n\n" + policy.safe_reply, blocked)
                    return
                yield OutputPiece(text, _take_report(call))
            while (decision := _take_report(call)) is not None:
                yield OutputPiece("", decision)
        finally:
            self._calls.pop(key, None)
            await stream.aclose()  # type: ignore[attr-defined]
            await redacted.aclose()

    async def _masked(
        self,
        principal: Principal,
        policy: GuardrailPolicy,
        tokens: AsyncIterator[str],
        call: _Call,
    ) -> AsyncIterator[str]:
        """The answer with personal data and profanity masked (their BLOCK actions are left
        to the NeMo output flow), cut where the local engine would cut it."""
        masking = policy.model_copy(deep=True)
        if masking.pii.output_action is GuardAction.BLOCK:
            masking.pii.enabled = False
        if masking.profanity.output_action is GuardAction.BLOCK:
            masking.profanity.enabled = False
        async for piece, decision in self._screened(principal, masking, tokens):
            if decision is not None:
                call.decisions.append(decision)
            if piece:
                yield piece

    async def _check_output_action(
        self, context: dict[str, Any] | None = None, **_: Any
    ) -> RailOutcome:
        call = self._call_of(context)
        chunk = str((context or {}).get("bot_message") or "")
        policy = call.policy
        profanity = policy.profanity
        if (
            profanity.enabled
            and profanity.output_action is GuardAction.BLOCK
            and (spans := find_profanity(chunk))
        ):
            call.decisions.append(
                GuardDecision("profanity", GuardAction.BLOCK, f"{len(spans)} word(s)")
            )
            return RailOutcome(decision=RailDecision.BLOCK, reason="profanity")
        pii = policy.pii
        if (
            pii.enabled
            and pii.output_action is GuardAction.BLOCK
            and (matches := find_pii(chunk, pii.kinds))
        ):
            kinds = ", ".join(sorted({m.kind.value for m in matches}))
            call.decisions.append(GuardDecision("pii", GuardAction.BLOCK, kinds))
            return RailOutcome(decision=RailDecision.BLOCK, reason="personal data")
        return RailOutcome(decision=RailDecision.ALLOW)


def _take_report(call: _Call) -> GuardDecision | None:
    """The next redaction decision not yet attached to a piece."""
    for i, decision in enumerate(call.decisions):
        if decision.action is not GuardAction.BLOCK:
            return call.decisions.pop(i)
    return None


def _error_of(chunk: str) -> str | None:
    """NeMo's streaming rails end a blocked stream with a JSON error chunk."""
    if not chunk.startswith('{"error"'):
        return None
    try:
        error = json.loads(chunk)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(error.get("message") or "blocked by an output rail")
