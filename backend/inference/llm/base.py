"""The interface every LLM provider implements, and the errors it may raise (stdlib only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it (it may be invalid)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call: `parameters` is a JSON schema."""

    name: str
    description: str
    parameters: dict[str, object]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # on an assistant message that called tools
    tool_call_id: str | None = None  # on a tool message: the call it answers


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer (`text`), the tool calls the model made (once, complete), or the
    final usage report (`prompt_tokens`...)."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a model picks its tokens. None: the endpoint's (or llama.cpp's) own default."""

    temperature: float = 0.7
    top_p: float | None = None
    repeat_penalty: float | None = None  # >1 makes a token already in the context less likely
    stop_repetition_tokens: int = 0  # end an answer whose last N tokens loop (0: never)
    seed: int | None = None  # fixed: the same answer every time (evaluations, tests)
    stop: tuple[str, ...] = ()  # sequences that end the answer (not included in it)


GREEDY = Sampling(temperature=0.0)


def estimate_tokens(messages: list[ChatMessage]) -> int:
    """Token count without the model's tokenizer: about four characters a token (English),
    plus the few tokens of each message's framing. Errs high, which is the safe side."""
    return sum(
        len(m.content) // 3 + 4 + sum(len(c.arguments) // 3 for c in m.tool_calls) for m in messages
    )


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
    supports_tools: bool  # whether `tools` reach the model (else the agent retrieves first)

    def stream(
        self,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        sampling: Sampling,
        tools: list[ToolSpec] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Streams the answer. Closing the iterator stops generation (and the HTTP stream).
        An answer that loops (see `Sampling.stop_repetition_tokens`) ends with finish_reason
        `repetition`. The last chunk reports the usage, prompt tokens included."""
        ...

    async def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Tokens the messages take in this model's context window."""
        ...

    async def aclose(self) -> None:
        """Releases the client or the model."""
        ...
