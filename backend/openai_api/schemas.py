"""The OpenAI wire format: request bodies as pydantic models, responses as plain dicts."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's own limit


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class InputMessage(BaseModel):
    """One message of the prompt. Text only: image parts and tool messages are refused."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SightlineOptions(BaseModel):
    """Sightline's own extras, in the body's `sightline` field (`extra_body` in the SDKs)."""

    model_config = ConfigDict(extra="forbid")

    knowledge: bool = False  # search the tenant's knowledge base and let the answer cite it
    # A turn of this stored conversation (a chat run: its memory and history, as sendMessage)
    conversation_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> SightlineOptions:
        if self.knowledge and self.conversation_id is not None:
            raise ValueError("in a conversation the agent searches the knowledge base itself")
        return self


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Parameters OpenAI has and Sightline does not use (logprobs,
    presence_penalty...) are ignored, as most OpenAI-compatible servers do; those that would
    change what the client gets back (n > 1, tools) are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = Field(None, max_length=0)
    sightline: SightlineOptions = Field(default_factory=SightlineOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in ([value] if isinstance(value, str) else value or [])):
            raise ValueError("a stop sequence is empty")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: text only (token arrays are refused); vectors as floats, or as
    base64 of little-endian float32 (what the openai SDK asks for unless told otherwise)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
