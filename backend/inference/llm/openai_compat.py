"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM).

Retries with exponential backoff on connect errors, 429 and 5xx, but only before the first
token: once text has reached a client, a retry would repeat it. Closing the iterator closes the
HTTP response, which is how a cancelled run stops the remote generation.

The SDK's requests go over aiohttp (`_AiohttpTransport`): httpx's own HTTP/1.1 stack is pure
Python, and reading a streamed chunk through it cost about 480 us of CPU here against about
270 us through aiohttp's (measured per token against the bench stub). aiohttp does not read the
HTTP(S)_PROXY variables as httpx does: when one is set, httpx carries the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx2
import openai
from openai._vendor.httpx_aiohttp.transport import AiohttpTransport

from backend.inference.llm.base import (
    ChatMessage,
    Chunk,
    LLMProtocolError,
    LLMTimeout,
    LLMUnavailable,
    Sampling,
    ToolCall,
    ToolSpec,
    estimate_tokens,
)
from backend.inference.llm.repetition import RepetitionStop

_RETRYABLE = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@contextlib.contextmanager
def _named_as_httpx() -> Iterator[None]:
    """aiohttp's failures under the names httpx gives them. The SDK's vendored transport calls
    a refused connection a connect timeout (so it was not retried, and said "did not start
    answering in time") and a dropped one a timeout too."""
    try:
        yield
    except httpx2.TransportError as exc:
        cause = exc.__cause__
        if isinstance(cause, asyncio.TimeoutError):  # aiohttp's timeouts: timeouts indeed
            raise
        if isinstance(cause, aiohttp.ClientConnectorError):
            raise httpx2.ConnectError(str(cause)) from cause
        if isinstance(cause, aiohttp.ServerDisconnectedError):
            raise httpx2.RemoteProtocolError(str(cause)) from cause
        if isinstance(cause, aiohttp.ClientConnectionError):
            raise httpx2.ReadError(str(cause)) from cause
        raise


class _Body(httpx2.AsyncByteStream):
    def __init__(self, stream: httpx2.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _named_as_httpx():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        with _named_as_httpx():
            await self._stream.aclose()


class _AiohttpTransport(AiohttpTransport):
    """The SDK's aiohttp transport, its failures named as httpx names them."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        with _named_as_httpx():
            response = await super().handle_async_request(request)
        response.stream = _Body(response.stream)  # type: ignore[arg-type]
        return response


def _http_client(timeout: openai.Timeout) -> httpx2.AsyncClient | None:
    """aiohttp under the SDK, unless a proxy is set in the environment (None: the SDK's own
    httpx client, which reads it)."""
    if any(os.environ.get(v) or os.environ.get(v.lower()) for v in _PROXY_VARIABLES):
        return None
    return httpx2.AsyncClient(transport=_AiohttpTransport(), timeout=timeout, follow_redirects=True)


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
        supports_tools: bool = True,
    ) -> None:
        self.name = model
        self.supports_tools = supports_tools
        self._model = model
        timeout = openai.Timeout(timeout_s, connect=connect_timeout_s)
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unused",
            timeout=timeout,
            max_retries=0,  # retried here, where we know whether a token was sent
            http_client=_http_client(timeout),
        )
        self._first_token_timeout_s = first_token_timeout_s
        self._retries = retries
        self._backoff_s = backoff_s

    async def aclose(self) -> None:
        await self._client.close()

    async def count_tokens(self, messages: list[ChatMessage]) -> int:
        return estimate_tokens(messages)  # the endpoint's tokenizer is not reachable offline

    async def stream(
        self,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        sampling: Sampling,
        tools: list[ToolSpec] | None = None,
    ) -> AsyncIterator[Chunk]:
        offered = tools if tools and self.supports_tools else None
        response = await self._open(messages, max_tokens, sampling, offered)
        finished = False
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments so far]
        loop = RepetitionStop(sampling.stop_repetition_tokens)
        produced = 0
        looped = False
        try:
            async for event in _events(response.response):
                usage = event.get("usage")
                if usage:
                    yield Chunk(
                        prompt_tokens=int(usage["prompt_tokens"]),
                        completion_tokens=int(usage["completion_tokens"]),
                    )
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        produced += 1
                        yield Chunk(text=str(delta["content"]))
                        if loop.add(str(delta["content"])):
                            finished = looped = True  # its usage would come last: estimated
                            yield Chunk(
                                finish_reason="repetition",
                                prompt_tokens=estimate_tokens(messages),
                                completion_tokens=produced,
                            )
                            break
                    for part in delta.get("tool_calls") or ():
                        call = calls.setdefault(int(part["index"]), ["", "", ""])
                        call[0] = part.get("id") or call[0]
                        function = part.get("function") or {}
                        call[1] = function.get("name") or call[1]
                        call[2] += function.get("arguments") or ""
                    if choice.get("finish_reason"):
                        finished = True
                        made = tuple(
                            ToolCall(id=c[0] or f"call_{i}", name=c[1], arguments=c[2])
                            for i, c in sorted(calls.items())
                            if c[1]
                        )
                        yield Chunk(finish_reason=str(choice["finish_reason"]), tool_calls=made)
                if looped:
                    break  # closing the response (below) stops the endpoint
        except (openai.APITimeoutError, httpx2.TimeoutException) as exc:
            raise LLMTimeout("the model stopped answering") from exc
        except (
            openai.APIError,
            httpx2.HTTPError,
            httpx2.StreamError,
            ValueError,
            LookupError,
            TypeError,
            AttributeError,
        ) as exc:
            # a chunk that is not the shape of a chat.completion.chunk, or the stream broke
            raise LLMProtocolError(f"bad stream from the model: {type(exc).__name__}") from exc
        finally:
            await response.close()
        if not finished:
            raise LLMProtocolError("the model's stream ended before it finished")

    async def _open(
        self,
        messages: list[ChatMessage],
        max_tokens: int,
        sampling: Sampling,
        tools: list[ToolSpec] | None,
    ) -> openai.AsyncStream[Any]:
        extra: dict[str, Any] = {}
        if sampling.top_p is not None:
            extra["top_p"] = sampling.top_p
        if sampling.repeat_penalty is not None:
            extra["repetition_penalty"] = sampling.repeat_penalty  # vLLM's name; not OpenAI's
        if sampling.seed is not None:
            extra["seed"] = sampling.seed
        if sampling.stop:
            extra["stop"] = list(sampling.stop)
        if tools:
            extra["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in tools
            ]
        for attempt in range(self._retries + 1):
            try:
                async with asyncio.timeout(self._first_token_timeout_s):
                    # The chunks come as plain dicts (`cast_to=object`): the SDK's typed
                    # ChatCompletionChunk costs more to build than the rest of a token's trip
                    # through the server. Auth, timeouts and typed errors stay the SDK's.
                    return await self._client.post(
                        "/chat/completions",
                        body={
                            "model": self._model,
                            "messages": [_wire(m) for m in messages],
                            "max_tokens": max_tokens,
                            "temperature": sampling.temperature,
                            "stream": True,
                            "stream_options": {"include_usage": True},
                            **extra,
                        },
                        cast_to=object,
                        stream=True,
                        # `object`, exactly: the SDK hands such chunks over untouched
                        stream_cls=openai.AsyncStream[object],
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


async def _events(response: httpx2.Response) -> AsyncIterator[Any]:
    """The JSON payloads of a Server-Sent Events body, up to `[DONE]`.

    The SDK's own reader (AsyncStream) goes through several generators and a Python loop per
    line for every token; this splits what each read brought at once. An `error` payload
    raises (as the SDK's reader does)."""
    pending = b""
    chunks = response.aiter_bytes()
    async for chunk in chunks:
        pending += chunk
        if b"\r" in pending:  # CRLF or CR line ends (the spec allows all three)
            pending = pending.replace(b"\r\n", b"\n")
            if not pending.endswith(b"\r"):  # a lone CR at the end may start a CRLF
                pending = pending.replace(b"\r", b"\n")
        if b"\n\n" not in pending:
            continue
        *blocks, pending = pending.split(b"\n\n")
        for block in blocks:
            data = [
                line[5:].removeprefix(b" ") for line in block.split(b"\n") if line[:5] == b"data:"
            ]
            if not data:
                continue  # a comment, or an event without data
            payload = data[0] if len(data) == 1 else b"\n".join(data)
            if payload.startswith(b"[DONE]"):
                async for _ in chunks:  # drained: an HTTP/1.1 connection can be reused
                    pass
                return
            event = json.loads(payload)
            if isinstance(event, dict) and event.get("error"):
                raise LLMProtocolError("the model reported an error mid-stream")
            yield event


def _wire(message: ChatMessage) -> dict[str, Any]:
    """One message in the Chat Completions format."""
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    return wire
