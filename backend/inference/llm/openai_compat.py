"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM).

Retries with exponential backoff on connect errors, 429 and 5xx, but only before the first
token: once text has reached a client, a retry would repeat it. Closing the iterator closes the
HTTP response, which is how a cancelled run stops the remote generation.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import openai

from backend.inference.llm.base import (
    ChatMessage,
    Chunk,
    LLMProtocolError,
    LLMTimeout,
    LLMUnavailable,
)

_RETRYABLE = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


class OpenAICompatibleProvider:
    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        first_token_timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.name = model
        self._model = model
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unused",
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=0,  # retried here, where we know whether a token was sent
        )
        self._first_token_timeout_s = first_token_timeout_s
        self._retries = retries
        self._backoff_s = backoff_s

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(
        self, messages: list[ChatMessage], *, max_tokens: int, temperature: float
    ) -> AsyncIterator[Chunk]:
        response = await self._open(messages, max_tokens, temperature)
        finished = False
        try:
            async for event in response:
                if event.usage is not None:
                    yield Chunk(
                        prompt_tokens=event.usage.prompt_tokens,
                        completion_tokens=event.usage.completion_tokens,
                    )
                for choice in event.choices or ():
                    text = choice.delta.content if choice.delta else None
                    if text:
                        yield Chunk(text=text)
                    if choice.finish_reason:
                        finished = True
                        yield Chunk(finish_reason=choice.finish_reason)
        except openai.APITimeoutError as exc:
            raise LLMTimeout("the model stopped answering") from exc
        except (openai.APIError, ValueError) as exc:
            raise LLMProtocolError(f"bad stream from the model: {type(exc).__name__}") from exc
        finally:
            await response.close()
        if not finished:
            raise LLMProtocolError("the model's stream ended before it finished")

    async def _open(
        self, messages: list[ChatMessage], max_tokens: int, temperature: float
    ) -> openai.AsyncStream:
        for attempt in range(self._retries + 1):
            try:
                async with asyncio.timeout(self._first_token_timeout_s):
                    return await self._client.chat.completions.create(
                        model=self._model,
                        messages=[{"role": m.role, "content": m.content} for m in messages],
                        max_tokens=max_tokens,
                        temperature=temperature,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
            except TimeoutError as exc:
                raise LLMTimeout("the model did not start answering in time") from exc
            except openai.APITimeoutError as exc:
                raise LLMTimeout("the model did not start answering in time") from exc
            except _RETRYABLE as exc:
                if attempt == self._retries:
                    raise LLMUnavailable(
                        f"model endpoint unavailable: {type(exc).__name__}"
                    ) from exc
                delay = self._backoff_s * 2**attempt * (0.5 + random.random())  # noqa: S311
                await asyncio.sleep(delay)
            except openai.APIStatusError as exc:
                raise LLMUnavailable(f"model endpoint refused: HTTP {exc.status_code}") from exc
        raise AssertionError("unreachable")
