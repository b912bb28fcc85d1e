"""Shared fixtures: one embedded PostgreSQL per session (migrated once), a rolled-back
transaction per test, the real Redis at 6379 with a key prefix per test, the app over ASGI,
and a real uvicorn server for WebSocket tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from backend.app import create_app
from backend.config import (
    ChatSettings,
    ClassifierMode,
    DatabaseSettings,
    DriftSettings,
    Environment,
    GuardrailSettings,
    KnowledgeSettings,
    LifecycleSettings,
    LogFormat,
    PrivacySettings,
    RedisSettings,
    ServerSettings,
    Settings,
    TelemetrySettings,
    VisionSettings,
)
from backend.core.db import Database
from backend.core.embedded import EmbeddedPostgres
from backend.core.migrations import upgrade_to_head
from backend.knowledge.embeddings import LocalEmbedder
from backend.services import Services

# Signed-in accounts (owner, member, stranger) for any test package.
pytest_plugins = ("tests.accounts",)

REDIS_URL = os.environ.get("SIGHTLINE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# Tests assert behaviour, not speed: every time limit in a test is generous, and scaled by
# SIGHTLINE_TEST_TIME_SCALE on a machine known to be slow or busy.
TIME_SCALE = float(os.environ.get("SIGHTLINE_TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    """A test's time limit, scaled for a slow or busy machine."""
    return seconds * TIME_SCALE


# The server's own time limits, generous in tests: a rail or a frame that takes long on a busy
# machine is slow, not refused (tests of the limits themselves set small ones).
GUARDRAIL_TIMEOUT_S = scaled(60)
VISION_TIMEOUTS = {"live_frame_timeout_s": scaled(120), "infer_timeout_s": scaled(120)}


# Spins until killed; the kernel kills it when its parent (the test process) dies.
_BURNER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit()\n"
    "while True: pass\n"
)


@pytest.fixture
def cpu_load() -> Iterator[None]:
    """A busy process per CPU while the test runs: races that need a loaded machine show."""
    burners = [
        subprocess.Popen([sys.executable, "-c", _BURNER, str(os.getpid())])
        for _ in range(os.cpu_count() or 2)
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def lifespan(application: Any) -> LifespanManager:
    """The app's lifespan with limits for a busy machine (asgi-lifespan's default is 5 s)."""
    return LifespanManager(application, startup_timeout=scaled(120), shutdown_timeout=scaled(60))


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SIGHTLINE_TEST_DATABASE_URL, or an embedded PostgreSQL with pgvector for this session."""
    configured = os.environ.get("SIGHTLINE_TEST_DATABASE_URL")
    if configured:
        yield DatabaseSettings(url=SecretStr(configured)).url.get_secret_value()  # type: ignore[union-attr]
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data")
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The session's engine, after migrations were applied once."""
    engine = create_async_engine(database_url)
    await upgrade_to_head(engine)
    yield engine
    await engine.dispose()


@asynccontextmanager
async def empty_database(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """An engine on a new, empty database of the session's server, dropped afterwards."""
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = create_async_engine(engine.url.set(database=name))
    try:
        yield fresh
    finally:
        await fresh.dispose()
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture
async def db_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection inside a transaction that is rolled back after the test."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        try:
            yield connection
        finally:
            await transaction.rollback()


@pytest.fixture
def db(db_connection: AsyncConnection) -> Database:
    """Sessions that commit into savepoints of the test's transaction (nothing outlives it)."""
    return Database.bound_to(db_connection, app_role=DatabaseSettings().app_role)


@pytest.fixture(scope="session")
async def embedder() -> AsyncIterator[LocalEmbedder]:
    """One real MiniLM embedder for the session (its worker process takes seconds to start)."""
    model = LocalEmbedder()
    await model.load()
    yield model
    await model.aclose()


@pytest.fixture
async def key_prefix() -> AsyncIterator[str]:
    """The test's own Redis key prefix. Every key under it is deleted afterwards: what the test
    wrote, and what the servers it started with `settings` wrote (torn down before this)."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis(key_prefix: str) -> AsyncIterator[Redis]:
    """The real Redis (the test's keys go with its `key_prefix`)."""
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def settings(database_url: str, key_prefix: str, tmp_path: os.PathLike[str]) -> Settings:
    return Settings(
        env=Environment.TEST,
        data_dir=tmp_path,
        database=DatabaseSettings(url=SecretStr(database_url), migrate_on_start=False),
        # the start-up PING: 2 s by default, which a busy machine exceeded once (ci-local
        # beside other test runs on 2 cores)
        redis=RedisSettings(
            url=SecretStr(REDIS_URL), key_prefix=key_prefix, connect_timeout_s=scaled(10)
        ),
        # Models load on first use, except in the tests of the warm-up (tests/test_warmup.py):
        # not a MiniLM worker per app in the background of every test.
        # No gc.freeze(): what one test's app froze could never be collected in later tests.
        server=ServerSettings(warm_up=False, gc_freeze=False),
        telemetry=TelemetrySettings(log_format=LogFormat.TEXT),
        # The packaged model is loaded only by the tests about it (tests/agents).
        chat=ChatSettings(local_model=False),
        # The inference pool (a worker process loading the vision models) only where tested.
        vision=VisionSettings(enabled=False, **VISION_TIMEOUTS),
        # The injection classifier's worker (torch) only where tested (tests/guardrails).
        guardrails=GuardrailSettings(
            check_timeout_s=GUARDRAIL_TIMEOUT_S, classifier=ClassifierMode.OFF
        ),
        # The periodic purge only where tested (tests/privacy): not in the background of others.
        privacy=PrivacySettings(purge_enabled=False),
        # The model registry's periodic re-read only where tested (tests/lifecycle): the app's
        # sessions share the test's one connection, and a background reader would interleave.
        lifecycle=LifecycleSettings(reconcile_s=3600.0),
        # Drift comparisons (database writes) only when a test asks (tests/lifecycle/test_drift).
        drift=DriftSettings(interval_s=3600.0),
        # The embedding versions' periodic re-read, likewise (a registry change still acts).
        knowledge=KnowledgeSettings(reembed_check_s=3600.0),
    )


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def app(
    settings: Settings, db: Database, redis: Redis, spans: InMemorySpanExporter
) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running, on the test's transaction and Redis prefix."""
    application = create_app(
        settings, db=db, redis=redis, span_processors=[SimpleSpanProcessor(spans)]
    )
    async with lifespan(application) as manager:
        application.state.asgi = manager.app  # the app with the lifespan state injected
        application.state.sightline = manager._state["sightline"]
        application.state.services = manager._state["services"]
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[AsyncClient]:
    transport = ASGITransport(app=app.state.asgi)
    async with AsyncClient(transport=transport, base_url="http://sightline.test") as http:
        yield http


SETPRIV = shutil.which("setpriv")  # util-linux


def dies_with_tests(command: list[str]) -> list[str]:
    """The command line of a server a test starts as a process (a Redis, a replica, an
    inference service), so that the kernel sends it SIGTERM when the test process dies: a
    killed pytest leaves nothing behind on its ports and data dirs. `setpriv` sets the death
    signal and executes the command in its place (same process).

    The signal fires when the *thread* that started the process ends, so only a start from
    the main thread (pytest's, and its event loops') gets it: one from `asyncio.to_thread`
    would die with that worker thread. Unchanged then, and where `setpriv` is missing."""
    if SETPRIV is None or threading.current_thread() is not threading.main_thread():
        return command
    return [SETPRIV, "--pdeathsig", "TERM", "--", *command]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    http_url: str
    ws_url: str
    app: FastAPI
    state: dict[str, Any] = field(default_factory=dict)  # the lifespan's: "services"...

    @property
    def services(self) -> Services:
        return self.state["services"]


def _listening_socket(port: int | None = None) -> socket.socket:
    """A loopback socket bound here and handed to uvicorn: no window between choosing a free
    port and binding it, in which another connection's ephemeral port could take it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    return sock


async def _start(server: uvicorn.Server, sock: socket.socket) -> asyncio.Task[None]:
    """Start `server` on `sock` and wait until it serves. uvicorn calls sys.exit when its app's
    start-up fails; a SystemExit out of a task escapes the session's event loop and breaks
    every test after it, so here it is an ordinary error of this one test."""

    async def serve() -> None:
        try:
            await server.serve([sock])
        except SystemExit as exited:
            raise RuntimeError(
                f"uvicorn could not start (exit {exited.code}): see its log"
            ) from None
        finally:
            sock.close()

    task = asyncio.create_task(serve())
    async with asyncio.timeout(scaled(120)):
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started serving")
            await asyncio.sleep(0.02)
    return task


@asynccontextmanager
async def serve_asgi(app: Any, port: int | None = None) -> AsyncIterator[int]:
    """Any ASGI app (a stub LLM, an identity provider) on a loopback port (free by default)."""
    sock = _listening_socket(port)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    task = await _start(server, sock)
    try:
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def serve_live(settings: Settings, **app_options: Any) -> AsyncIterator[LiveServer]:
    """A real uvicorn server on a free port, with its own connection pool (`app_options` go
    to `create_app`: the agent's tools and rails)."""
    application = create_app(settings, **app_options)
    state: dict[str, Any] = {}
    lifespan_of = application.router.lifespan_context

    @asynccontextmanager
    async def kept(app: Any) -> AsyncIterator[Any]:  # the services, for tests to reach
        async with lifespan_of(app) as opened:
            state.update(opened or {})
            yield opened

    application.router.lifespan_context = kept
    sock = _listening_socket()
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        application, log_config=None, lifespan="on", ws_max_size=settings.ws_max_message_bytes
    )
    server = uvicorn.Server(config)
    task = await _start(server, sock)
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/graphql", application, state
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, scaled(60))
        await forget_registry(settings)


async def forget_registry(settings: Settings) -> None:
    """Empties the model registry a live server committed to. It is platform-wide (not per
    tenant): what this server seeded (chat aliases on its own stub servers, its vision models)
    would be served, and routed to, by the next test's server."""
    if settings.database.url is None:
        return
    engine = create_async_engine(settings.database.url.get_secret_value())
    try:
        async with engine.begin() as connection:
            await connection.execute(text("DELETE FROM registry_models"))
            # which embedding slot serves: the next server starts on its embedder's own
            await connection.execute(text("DELETE FROM knowledge_embeddings"))
    finally:
        await engine.dispose()


@pytest.fixture
async def live_server(settings: Settings, engine: AsyncEngine) -> AsyncIterator[LiveServer]:
    """`serve_live` on the test's settings (the engine fixture has migrated the database)."""
    async with serve_live(settings) as server:
        yield server
