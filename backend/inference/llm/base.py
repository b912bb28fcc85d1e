"""The interface every LLM provider implements, and the errors it may raise (stdlib only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer (`text`), or the final usage report (`prompt_tokens`...)."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class LLMError(Exception):
    """Base of provider failures; `code` is what a run reports in RunFailed."""

    code = "LLM_ERROR"


class LLMUnavailable(LLMError):
    code = "LLM_UNAVAILABLE"  # connect errors, 429 and 5xx after the retries


class LLMTimeout(LLMError):
    code = "LLM_TIMEOUT"


class LLMProtocolError(LLMError):
    code = "LLM_BAD_RESPONSE"  # garbage, or the stream closed without finishing


class LLMProvider(Protocol):
    name: str

    def stream(
        self, messages: list[ChatMessage], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[Chunk]:
        """Streams the answer. Closing the iterator stops generation (and the HTTP stream)."""
        ...

    async def aclose(self) -> None:
        """Releases the client or the model."""
        ...
