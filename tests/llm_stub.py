"""An OpenAI-compatible chat endpoint for tests and benchmarks: streams tokens at a set rate.

The model name picks a behaviour: `echo` (answers the last user message word by word),
`verbatim` (the last user message word by word, its line breaks and spacing kept),
`fail-<n>` (HTTP 503 for the first n calls, then echo), `rate-limited` (always 429),
`garbage` (a malformed chunk), `cut` (closes mid-stream without finishing), `stall` (sends
headers, then nothing), `tools` (when offered tools, calls the first one with the last user
message as `query`; given the tool's result, answers "Found it [1] and [2]."). Every request
body is kept in `requests`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class LLMStub:
    def __init__(self, tokens_per_s: float = 1000.0, answer_tokens: int | None = None) -> None:
        self.interval = 1.0 / tokens_per_s
        self.answer_tokens = answer_tokens
        self.calls = 0
        self.failures: dict[str, int] = {}
        self.open_streams = 0
        self.closed_early = 0
        self.requests: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self.complete, methods=["POST"])]
        )

    def _words(self, body: dict[str, Any]) -> list[str]:
        last = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        if body.get("model") == "verbatim":
            words = re.findall(r"\s*\S+", str(last)) or ["ok"]
        else:
            words = [w + " " for w in str(last).split()] or ["ok "]
        if self.answer_tokens:
            words = (words * (self.answer_tokens // len(words) + 1))[: self.answer_tokens]
        return words

    async def complete(self, request: Request) -> Response:
        self.calls += 1
        body = await request.json()
        self.requests.append(body)
        model = str(body.get("model", "echo"))
        if model == "tools":
            return StreamingResponse(self._tool_sse(body), media_type="text/event-stream")
        if model.startswith("fail-"):
            seen = self.failures.get(model, 0)
            if seen < int(model.split("-")[1]):
                self.failures[model] = seen + 1
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        if model == "rate-limited":
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429)
        return StreamingResponse(
            self._sse(model, self._words(body)), media_type="text/event-stream"
        )

    async def _sse(self, model: str, words: list[str]) -> AsyncIterator[bytes]:
        self.open_streams += 1
        finished = False
        try:
            if model == "stall":
                await asyncio.sleep(3600)
            for i, word in enumerate(words):
                if model == "garbage" and i == 1:
                    yield b"data: {not json\n\n"
                    return
                if model == "cut" and i == len(words) // 2:
                    return
                chunk = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                    "emitted_at": time.time(),
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(self.interval)
            done = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            usage = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": 7,
                    "completion_tokens": len(words),
                    "total_tokens": 7 + len(words),
                },
            }
            tail = f"data: {json.dumps(done)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
            yield tail.encode()
            finished = True
        finally:
            self.open_streams -= 1
            if not finished:
                self.closed_early += 1

    async def _tool_sse(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        last = body["messages"][-1]
        if body.get("tools") and last["role"] == "user":
            name = body["tools"][0]["function"]["name"]
            arguments = json.dumps({"query": last["content"]})
            deltas = [
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                },
                {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:5]}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": arguments[5:]}}]},
            ]
            finish = "tool_calls"
        else:
            deltas = [{"content": w} for w in ("Found ", "it ", "[1", "] ", "and ", "[2].")]
            finish = "stop"
        for delta in [*deltas, {}]:
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "tools",
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": None if delta else finish}
                ],
            }
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(self.interval)
        yield b"data: [DONE]\n\n"


# Base-20 digits with no vowels and no numerals: a clock word is neither a word nor a number,
# so the output rails (PII, profanity) pass it through as it comes.
CLOCK_DIGITS = "bcdfghjklmnpqrstvwxz"


def clock_word(at: float) -> str:
    """`at` (seconds since the epoch) to the microsecond, as a clock word."""
    n, digits = round(at * 1e6), []
    while n:
        n, digit = divmod(n, len(CLOCK_DIGITS))
        digits.append(CLOCK_DIGITS[digit])
    return "".join(reversed(digits))


def clock_time(word: str) -> float:
    n = 0
    for ch in word:
        n = n * len(CLOCK_DIGITS) + CLOCK_DIGITS.index(ch)
    return n / 1e6


class ClockStub(LLMStub):
    """Every token is the time it was emitted, as a clock word (`clock_word`) and a space:
    latency can be measured at the receiving end, through any number of hops and rails."""

    def _words(self, body: dict[str, Any]) -> list[str]:
        return [""] * (self.answer_tokens or 50)

    async def _sse(self, model: str, words: list[str]) -> AsyncIterator[bytes]:
        self.open_streams += 1
        try:
            for _ in words:
                chunk = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": f"{clock_word(time.time())} "},
                            "finish_reason": None,
                        }
                    ],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(self.interval)
            done = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.open_streams -= 1


def bench_app() -> Starlette:
    """`uvicorn --factory tests.llm_stub:bench_app` (rate and length from the environment)."""
    import os

    stub = ClockStub(
        tokens_per_s=float(os.environ.get("STUB_TOKENS_PER_S", "20")),
        answer_tokens=int(os.environ.get("STUB_ANSWER_TOKENS", "100")),
    )
    return stub.app
