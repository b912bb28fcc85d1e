"""The rails the agent's guard nodes call. The guardrails package implements `Guards`; with the
rails off (`SIGHTLINE_GUARDRAILS_ENABLED=false`), `PassThroughGuards` lets everything through
unchanged.

Every decision a rail takes comes back as a `GuardDecision`, which the agent turns into a
`GuardrailTriggered` event in the run's stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from backend.agents.tools import Source
from backend.auth.principal import Principal


class GuardAction(StrEnum):
    BLOCK = "block"
    REDACT = "redact"
    WARN = "warn"


@dataclass(frozen=True)
class GuardDecision:
    rail: str  # "jailbreak", "pii", "topic"...
    action: GuardAction
    reason: str


@dataclass(frozen=True)
class InputVerdict:
    text: str  # what the model gets (redacted when a rail redacted)
    decisions: tuple[GuardDecision, ...] = ()
    safe_reply: str = "I can't help with that request."

    @property
    def blocked(self) -> bool:
        return any(d.action is GuardAction.BLOCK for d in self.decisions)


@dataclass(frozen=True)
class RetrievalVerdict:
    sources: list[Source]
    decisions: tuple[GuardDecision, ...] = ()


@dataclass(frozen=True)
class OutputPiece:
    """What the client sees next: text (possibly redacted), and the decision that produced it.
    A BLOCK decision ends the stream; `text` is then the safe message."""

    text: str
    decision: GuardDecision | None = None


class Guards(Protocol):
    async def check_input(
        self, principal: Principal, text: str, history: list[str]
    ) -> InputVerdict: ...

    async def check_retrieved(
        self, principal: Principal, sources: list[Source]
    ) -> RetrievalVerdict: ...

    def check_output_stream(
        self, principal: Principal, tokens: AsyncIterator[str]
    ) -> AsyncIterator[OutputPiece]: ...

    async def rewrite_history(self, principal: Principal, texts: list[str]) -> list[str]:
        """Earlier user messages read back into the agent's memory (after it expired), rewritten
        as the input rails rewrite a message (redaction, masking): the model sees an earlier
        turn as it saw it then. Cheap: no classifier, and no new decision."""
        ...


class PassThroughGuards:
    async def check_input(
        self, principal: Principal, text: str, history: list[str]
    ) -> InputVerdict:
        return InputVerdict(text=text)

    async def check_retrieved(
        self, principal: Principal, sources: list[Source]
    ) -> RetrievalVerdict:
        return RetrievalVerdict(sources=sources)

    async def check_output_stream(
        self, principal: Principal, tokens: AsyncIterator[str]
    ) -> AsyncIterator[OutputPiece]:
        async for token in tokens:
            yield OutputPiece(token)

    async def rewrite_history(self, principal: Principal, texts: list[str]) -> list[str]:
        return texts
