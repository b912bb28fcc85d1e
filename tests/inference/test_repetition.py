"""The stop on runaway repetition: the detector, and both providers ending a looping stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from backend.inference.llm import local
from backend.inference.llm.base import ChatMessage, Sampling
from backend.inference.llm.openai_compat import OpenAICompatibleProvider
from backend.inference.llm.repetition import RepetitionStop
from tests.conftest import serve_asgi
from tests.llm_stub import LLMStub


def first_stop(window: int, tokens: list[str]) -> int | None:
    """How many tokens the detector let through before it called a loop (None: never)."""
    stop = RepetitionStop(window)
    for i, token in enumerate(tokens, 1):
        if stop.add(token):
            return i
    return None


def test_a_one_token_loop_stops_after_the_window() -> None:
    assert first_stop(12, ["M"] + ["mm"] * 200) == 13


def test_a_sentence_said_over_and_over_stops() -> None:
    sentence = ["I", "'ll", " make", " you", " a", " cake", "."]
    assert first_stop(24, sentence * 10) == 24  # 7-token cycle, 3+ times in the window


def test_ordinary_text_and_short_echoes_go_on() -> None:
    words = [
        "The",
        "capital",
        "of",
        "France",
        "is",
        "Paris",
        ".",
        "It",
        "is",
        "on",
        "the",
        "Seine",
        ",",
        "and",
        "it",
        "is",
        "old",
        ".",
    ]
    assert first_stop(12, words * 1) is None
    # a cycle longer than a third of the window is not a loop yet
    assert first_stop(12, ["a", "b", "c", "d", "e"] * 2 + ["x"]) is None
    assert first_stop(0, ["mm"] * 500) is None  # 0: off


@pytest.fixture
async def looping_endpoint() -> AsyncIterator[tuple[LLMStub, str]]:
    stub = LLMStub(tokens_per_s=2000, answer_tokens=5000)  # echoes "Mm " for 5,000 tokens
    async with serve_asgi(stub.app) as port:
        yield stub, f"http://127.0.0.1:{port}/v1"


async def test_an_endpoint_stream_that_loops_is_ended(
    looping_endpoint: tuple[LLMStub, str],
) -> None:
    stub, url = looping_endpoint
    provider = OpenAICompatibleProvider(base_url=url, model="echo", api_key=None)
    sampling = Sampling(temperature=0.2, top_p=0.9, repeat_penalty=1.1, stop_repetition_tokens=16)
    chunks = [
        c
        async for c in provider.stream(
            [ChatMessage("user", "Mm")], max_tokens=5000, sampling=sampling
        )
    ]
    assert "".join(c.text for c in chunks) == "Mm " * 16
    assert chunks[-1].finish_reason == "repetition"
    assert chunks[-1].completion_tokens == 16
    assert chunks[-1].prompt_tokens
    # the sampling reached the endpoint (vLLM's name for the penalty)
    sent = stub.requests[-1]
    assert (sent["temperature"], sent["top_p"], sent["repetition_penalty"]) == (0.2, 0.9, 1.1)
    await provider.aclose()


class LoopingLlama:
    """llama.cpp's Llama as the local provider uses it, falling into "Mmmm…" forever."""

    def __init__(self) -> None:
        self.closed = False
        self.asked: dict[str, Any] = {}

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        return list(range(len(text.split())))

    def create_chat_completion(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.asked = kwargs

        def pieces() -> Iterator[dict[str, Any]]:
            try:
                yield {"choices": [{"delta": {"content": "M"}, "finish_reason": None}]}
                while True:
                    yield {"choices": [{"delta": {"content": "mm"}, "finish_reason": None}]}
            finally:
                self.closed = True

        return pieces()


async def test_the_local_model_stops_a_runaway_answer(tmp_path: Any) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"")
    provider = local.LocalLlamaProvider(weights)
    llama = LoopingLlama()
    provider._llama = llama  # loaded: the stand-in generates
    sampling = Sampling(temperature=0.2, top_p=0.9, repeat_penalty=1.1, stop_repetition_tokens=20)
    chunks = [
        c
        async for c in provider.stream(
            [ChatMessage("user", "My name is Priya")], max_tokens=512, sampling=sampling
        )
    ]
    assert "".join(c.text for c in chunks) == "M" + "mm" * 20
    assert chunks[-1].finish_reason == "repetition"
    assert chunks[-1].completion_tokens == 21
    assert chunks[-1].prompt_tokens  # counted, not left at 0
    assert llama.closed  # llama.cpp's generation loop was ended
    assert {k: llama.asked[k] for k in ("temperature", "top_p", "repeat_penalty")} == {
        "temperature": 0.2,
        "top_p": 0.9,
        "repeat_penalty": 1.1,
    }
