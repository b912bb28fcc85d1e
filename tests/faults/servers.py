"""Servers a fault test owns, so that it can stop, restart and kill them: a private Redis, a
private embedded PostgreSQL, and `sightline serve` processes; plus one stub for the LLM and the
embedding endpoint (both OpenAI-compatible) that the servers call."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from backend.core.embedded import EmbeddedPostgres, local_redis_answers
from tests.conftest import dies_with_tests, free_port
from tests.llm_stub import LLMStub

# Test timeouts are generous, for a busy machine; nothing asserts how fast anything is.
PATIENCE_S = float(os.environ.get("SIGHTLINE_TEST_PATIENCE_S", "120"))
ROOT = Path(__file__).resolve().parents[2]


class Stubs:
    """The LLM stub (`echo` answers word by word at a set rate) and an embedding endpoint
    (deterministic vectors; `delay_s` per call makes ingestion slow enough to interrupt)."""

    def __init__(self, tokens_per_s: float = 10.0, answer_tokens: int = 60) -> None:
        self.llm = LLMStub(tokens_per_s=tokens_per_s, answer_tokens=answer_tokens)
        self.embedding_delay_s = 0.0
        self.embedding_calls = 0
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.llm.complete, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            ]
        )

    async def embeddings(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.embedding_calls += 1
        if self.embedding_delay_s:
            await asyncio.sleep(self.embedding_delay_s)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return JSONResponse(
            {
                "object": "list",
                "model": body.get("model", "stub"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": _vector(t)}
                    for i, t in enumerate(texts)
                ],
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }
        )


def _vector(text: str) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    vector = np.random.default_rng(seed).standard_normal(384)
    return (vector / np.linalg.norm(vector)).tolist()  # type: ignore[no-any-return]


class PrivateRedis:
    """A `redis-server` of the test's own on a free port, persisting every write (AOF, fsync
    always) so that a stop and a restart lose nothing, as a production Redis is run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("tests/faults runs a Redis of its own: put redis-server on PATH")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            dies_with_tests([
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--protected-mode", "no",
            ]),
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + PATIENCE_S
        while not local_redis_answers(port=self.port):
            assert self.process.poll() is None, (self.directory / "redis.log").read_text()
            assert time.monotonic() < deadline, "the private Redis did not start"
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: Redis holds every command (as a hung node or a partition does)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM: Redis finishes its writes (the AOF) and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(PATIENCE_S)
        self.process = None


@dataclass
class PrivatePostgres:
    """An embedded PostgreSQL (pgvector) of the test's own, migrated; it can be stopped and
    started again on the same data directory (the URL stays the same)."""

    directory: Path
    url: str = ""
    _server: EmbeddedPostgres | None = field(default=None, repr=False)

    def start(self) -> str:
        self._server = EmbeddedPostgres(self.directory)
        self.url = self._server.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "backend", "migrate"],
            env={**_base_environment(), "SIGHTLINE_DATABASE_URL": self.url},
            check=True,
            capture_output=True,
            timeout=PATIENCE_S,
        )


def _base_environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIGHTLINE_")}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return environment


class AppServer:
    """`sightline serve` in a process of its own, so that it can be killed with SIGKILL."""

    def __init__(self, directory: Path, environment: dict[str, str], workers: int = 1) -> None:
        self.directory = directory
        self.port = free_port()
        self.environment = {
            **_base_environment(),
            "SIGHTLINE_DATA_DIR": str(directory),
            **environment,
        }
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "server.log").open("ab")
        command = [sys.executable, "-m", "backend", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(
            dies_with_tests([*command, "--workers", str(self.workers)]),
            env=self.environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def ready(self) -> None:
        async with asyncio.timeout(PATIENCE_S), httpx.AsyncClient() as http:
            while True:
                assert self.process is not None
                assert self.process.poll() is None, self.log()
                try:
                    if (await http.get(f"{self.http_url}/readyz", timeout=2)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def descendants(self) -> list[psutil.Process]:
        assert self.process is not None
        return psutil.Process(self.process.pid).children(recursive=True)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a node dies or the OOM killer strikes."""
        assert self.process is not None
        self.process.kill()
        await asyncio.to_thread(self.process.wait, PATIENCE_S)

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, PATIENCE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, PATIENCE_S)

    def log(self, tail: int | None = 6000) -> str:
        path = self.directory / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[-tail:] if tail else text


def server_environment(
    *, database_url: str, redis_url: str, stubs_url: str, **extra: Any
) -> dict[str, str]:
    """What the fault tests' servers run with: short leases (a lost replica is noticed in
    seconds), the stubs, no guardrails and no vision (not what is under test)."""
    environment = {
        "SIGHTLINE_DATABASE_URL": database_url,
        "SIGHTLINE_DATABASE_MIGRATE_ON_START": "false",
        "SIGHTLINE_REDIS_URL": redis_url,
        "SIGHTLINE_REDIS_KEY_PREFIX": "faults:",
        "SIGHTLINE_CHAT_LLM_BASE_URL": f"{stubs_url}/v1",
        "SIGHTLINE_CHAT_LLM_MODEL": "echo",
        "SIGHTLINE_CHAT_LOCAL_MODEL": "false",
        "SIGHTLINE_CHAT_LLM_RETRIES": "1",
        "SIGHTLINE_CHAT_RUN_LEASE_S": "1",
        "SIGHTLINE_CHAT_RUN_LOST_GRACE_S": "3",
        "SIGHTLINE_CHAT_MAX_ACTIVE_RUNS_PER_USER": "1",
        "SIGHTLINE_KNOWLEDGE_EMBEDDING_BASE_URL": f"{stubs_url}/v1",
        "SIGHTLINE_KNOWLEDGE_EMBEDDING_MODEL": "stub-embeddings",
        "SIGHTLINE_KNOWLEDGE_EMBED_BATCH": "4",
        "SIGHTLINE_KNOWLEDGE_JOB_LEASE_S": "1",
        "SIGHTLINE_KNOWLEDGE_JOB_LOST_GRACE_S": "3",
        "SIGHTLINE_GUARDRAILS_ENABLED": "false",
        "SIGHTLINE_VISION_ENABLED": "false",
        # ready once PostgreSQL and Redis answer, as these tests expect: the models warm up in
        # the background (tests/test_warmup.py tests readiness after the warm-up)
        "SIGHTLINE_SERVER_READY_AFTER_WARM_UP": "false",
        "SIGHTLINE_TELEMETRY_LOG_FORMAT": "text",
    }
    environment.update({f"SIGHTLINE_{k.upper()}": str(v) for k, v in extra.items()})
    return environment


@asynccontextmanager
async def serving(*servers: AppServer) -> AsyncIterator[None]:
    """Starts the servers and waits until they are ready; stops them at the end (those still
    running). When the block fails, their logs are printed (pytest shows them)."""
    for server in servers:
        server.start()
    try:
        await asyncio.gather(*(server.ready() for server in servers))
        yield
    except BaseException:
        for server in servers:
            print(f"-- {server.directory.name}:", server.log(), sep="\n")
        raise
    finally:
        await asyncio.gather(*(server.stop() for server in servers))
