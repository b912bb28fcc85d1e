"""The OpenAI-compatible provider against a real HTTP stub: streaming, retries, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx2
import openai
import pytest

from backend.inference.llm.base import (
    GREEDY,
    ChatMessage,
    LLMProtocolError,
    LLMTimeout,
    LLMUnavailable,
)
from backend.inference.llm.openai_compat import (
    OpenAICompatibleProvider,
    _AiohttpTransport,
    _events,
    _http_client,
)
from tests.conftest import free_port, scaled, serve_asgi
from tests.llm_stub import LLMStub

HELLO = [ChatMessage("user", "hello there general kenobi")]


@pytest.fixture
async def stub() -> AsyncIterator[tuple[LLMStub, str]]:
    llm = LLMStub(tokens_per_s=200)
    async with serve_asgi(llm.app) as port:
        yield llm, f"http://127.0.0.1:{port}/v1"


def provider(url: str, model: str = "echo", **kwargs: float) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(
        base_url=url, model=model, api_key=None, backoff_s=0.01, **kwargs
    )


async def test_streams_text_and_usage(stub: tuple[LLMStub, str]) -> None:
    _, url = stub
    chunks = [c async for c in provider(url).stream(HELLO, max_tokens=50, sampling=GREEDY)]
    assert "".join(c.text for c in chunks) == "hello there general kenobi "
    assert chunks[-1].completion_tokens == 4
    assert any(c.finish_reason == "stop" for c in chunks)


async def test_retries_before_the_first_token(stub: tuple[LLMStub, str]) -> None:
    llm, url = stub
    chunks = [c async for c in provider(url, "fail-2").stream(HELLO, max_tokens=5, sampling=GREEDY)]
    assert "".join(c.text for c in chunks)
    assert llm.calls == 3


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("fail-9", LLMUnavailable),
        ("rate-limited", LLMUnavailable),
        ("garbage", LLMProtocolError),
        ("cut", LLMProtocolError),
    ],
)
async def test_failures_are_typed(
    stub: tuple[LLMStub, str], model: str, error: type[Exception]
) -> None:
    _, url = stub
    with pytest.raises(error):
        [c async for c in provider(url, model).stream(HELLO, max_tokens=5, sampling=GREEDY)]


async def test_an_endpoint_that_refuses_connections_is_retried_then_unavailable() -> None:
    """Not a timeout: aiohttp's own error names made it one, and it was never retried."""
    down = provider(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(LLMUnavailable, match="APIConnectionError"):
        [c async for c in down.stream(HELLO, max_tokens=5, sampling=GREEDY)]


async def test_requests_go_over_aiohttp_unless_a_proxy_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    client = _http_client(openai.Timeout(5))
    assert client is not None
    assert isinstance(client._transport, _AiohttpTransport)
    await client.aclose()
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    assert _http_client(openai.Timeout(5)) is None  # httpx, which reads the variable


async def test_a_stalled_stream_times_out(stub: tuple[LLMStub, str]) -> None:
    _, url = stub
    slow = provider(url, "stall", timeout_s=0.5, first_token_timeout_s=2)
    with pytest.raises(LLMTimeout):
        [c async for c in slow.stream(HELLO, max_tokens=5, sampling=GREEDY)]


async def test_closing_the_iterator_closes_the_upstream_stream(stub: tuple[LLMStub, str]) -> None:
    llm, url = stub
    llm.answer_tokens = 1000
    stream = provider(url).stream(HELLO, max_tokens=1000, sampling=GREEDY)
    async for _ in stream:
        break
    await stream.aclose()  # what a cancelled run does
    async with asyncio.timeout(scaled(30)):
        while llm.open_streams:
            await asyncio.sleep(0.01)
    assert llm.closed_early == 1


async def _body(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize(
    "parts",
    [
        (b'data: {"a": 1}\n\ndata: {"a": 2}\n\ndata: [DONE]\n\n',),
        (b'data: {"a"', b": 1}\n", b'\ndata: {"a": 2}\n\n', b"data: [DONE]\n\n"),
        (
            b'data: {"a": 1}\r\n\r\n: a comment\r\n\r\ndata: {"a": 2}\r',
            b"\n\r\ndata: [DONE]\r\n\r\n",
        ),
        (b'event: x\ndata: {"a":\ndata: 1}\n\ndata:{"a": 2}\n\ndata: [DONE]\n\nignored',),
    ],
)
async def test_the_event_reader_splits_any_framing(parts: tuple[bytes, ...]) -> None:
    response = httpx2.Response(200, content=_body(*parts))
    assert [e async for e in _events(response)] == [{"a": 1}, {"a": 2}]


async def test_an_error_payload_mid_stream_is_a_protocol_error() -> None:
    response = httpx2.Response(200, content=_body(b'data: {"error": {"message": "x"}}\n\n'))
    with pytest.raises(LLMProtocolError):
        [e async for e in _events(response)]
