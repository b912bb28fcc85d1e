"""Fixtures of the fault suite: a private PostgreSQL for the package, a private Redis and the
stubs per test, an account, and the few client calls the tests make."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy import func, select

from backend.auth.passwords import hash_password
from backend.config import DatabaseSettings
from backend.core.db import Database
from backend.core.models import (
    Chunk,
    Document,
    IngestionJob,
    IngestionUpload,
    Message,
    MessageRole,
    Run,
    Tenant,
    User,
    UserRole,
)
from backend.core.redis import KeySpace
from backend.realtime.eventlog import RunEvent, RunEventLog
from tests.conftest import serve_asgi
from tests.faults.servers import (
    PATIENCE_S,
    AppServer,
    PrivatePostgres,
    PrivateRedis,
    Stubs,
    server_environment,
)
from tests.graphql.ws import init, open_socket, receive, subscribe

PASSWORD = "a good long password"
KEY_PREFIX = "faults:"
ANSWER_TOKENS = 60


@pytest.fixture(scope="package")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(tmp_path_factory.mktemp("faults-postgres") / "data")
    server.start()
    try:
        server.migrate()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def database(postgres: PrivatePostgres) -> AsyncIterator[Database]:
    db = Database.connect(postgres.url, DatabaseSettings(url=SecretStr(postgres.url)))
    yield db
    await db.dispose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis(private_redis: PrivateRedis) -> AsyncIterator[Redis]:
    """A client of the private Redis (for the test's own reads)."""
    client = Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def stubs() -> AsyncIterator[tuple[Stubs, str]]:
    stub = Stubs()
    async with serve_asgi(stub.app) as port:
        yield stub, f"http://127.0.0.1:{port}"


@pytest.fixture
def environment(
    postgres: PrivatePostgres, private_redis: PrivateRedis, stubs: tuple[Stubs, str]
) -> dict[str, str]:
    """The servers' settings; answers of ANSWER_TOKENS words at 10 a second, and embedding
    calls slow enough (0.25 s) that a job is under way for seconds."""
    stub, url = stubs
    stub.llm.answer_tokens = ANSWER_TOKENS
    stub.embedding_delay_s = 0.25
    return server_environment(database_url=postgres.url, redis_url=private_redis.url, stubs_url=url)


@pytest.fixture
async def account(database: Database) -> dict[str, Any]:
    slug = f"faults-{secrets.token_hex(4)}"
    async with database.session() as session:
        tenant = Tenant(slug=slug, name="Faults")
        session.add(tenant)
    async with database.session(tenant.id) as session:
        user = User(
            tenant_id=tenant.id,
            email="u@faults.example",
            role=UserRole.OWNER,
            password_hash=await hash_password(PASSWORD),
        )
        session.add(user)
    return {"tenant": slug, "tenant_id": tenant.id, "user_id": user.id}


async def sign_in(http_url: str, account: dict[str, Any]) -> str:
    async with httpx.AsyncClient(base_url=http_url, timeout=PATIENCE_S) as http:
        response = await http.post(
            "/oauth/token",
            data={
                "grant_type": "password",
                "tenant": account["tenant"],
                "username": "u@faults.example",
                "password": PASSWORD,
            },
        )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def gql(http_url: str, token: str, query: str, **variables: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=http_url, timeout=PATIENCE_S) as http:
        response = await http.post(
            "/graphql",
            json={"query": query, "variables": variables},
            headers={"authorization": f"Bearer {token}"},
        )
    return dict(response.json())


async def send_message(
    http_url: str, token: str, content: str, conversation: str | None = None
) -> tuple[str, str]:
    """Starts a turn (in a new conversation unless one is named): (conversation, run)."""
    if conversation is None:
        created = await gql(http_url, token, 'mutation { createConversation(title: "f") { id } }')
        conversation = created["data"]["createConversation"]["id"]
    sent = await gql(
        http_url,
        token,
        "mutation($c: ID!, $m: String!) { sendMessage(conversationId: $c, content: $m) "
        "{ run { id } } }",
        c=conversation,
        m=content,
    )
    assert "errors" not in sent, sent
    return str(conversation), str(sent["data"]["sendMessage"]["run"]["id"])


async def ingest(http_url: str, token: str, text: str, source: str) -> str:
    done = await gql(
        http_url,
        token,
        "mutation($t: String!, $s: String!) { ingestDocument(text: $t, source: $s) { id } }",
        t=text,
        s=source,
    )
    assert "errors" not in done, done
    return str(done["data"]["ingestDocument"]["id"])


RUN_EVENTS = """subscription($r: ID!, $after: String) { runEvents(runId: $r, after: $after) {
  __typename cursor
  ... on TokenDelta { text index }
  ... on RunCompleted { messageId }
  ... on RunFailed { code message messageId } } }"""


class Watcher:
    """A client subscribed to a stream of events (`field` of `query`) on one server, in the
    background: what it saw, and whether the stream ended (a subscriber must never be left
    hanging)."""

    def __init__(
        self, ws_url: str, token: str, query: str, variables: dict[str, Any], field: str
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._watch(ws_url, token, query, variables, field))

    async def _watch(
        self, ws_url: str, token: str, query: str, variables: dict[str, Any], field: str
    ) -> None:
        async with await open_socket(ws_url) as ws:
            await init(ws, {"authorization": f"Bearer {token}"})
            await subscribe(ws, query, variables)
            while True:
                message = await receive(ws, timeout=PATIENCE_S)
                if message["type"] == "complete":
                    return
                assert message["type"] == "next", message
                assert "errors" not in message["payload"], message
                self.events.append(message["payload"]["data"][field])

    async def ended(self) -> dict[str, Any]:
        await asyncio.wait_for(self.task, PATIENCE_S)
        return self.events[-1]


class RunWatcher(Watcher):
    """A client reading a run's events (those after the cursor `after`, when given)."""

    def __init__(self, ws_url: str, token: str, run_id: str, after: str | None = None) -> None:
        super().__init__(ws_url, token, RUN_EVENTS, {"r": run_id, "after": after}, "runEvents")

    def tokens(self) -> int:
        return sum(1 for e in self.events if e["__typename"] == "TokenDelta")

    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["__typename"] == "TokenDelta")


async def until(check: Any, what: str, timeout_s: float = PATIENCE_S) -> None:
    """Waits until `check()` (sync or async) is true."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.1)


def run_log(redis: Redis) -> RunEventLog:
    return RunEventLog(redis, KeySpace(KEY_PREFIX))


def job_log(redis: Redis) -> RunEventLog:
    return RunEventLog(redis, KeySpace(KEY_PREFIX).child("kb"))


async def events_of(log: RunEventLog, stream: str) -> list[RunEvent]:
    """Every event of a stream, following it until its terminal event."""
    async with asyncio.timeout(PATIENCE_S), aclosing(log.read(stream)) as events:  # type: ignore[type-var]
        return [event async for event in events]


def document_text(paragraphs: int = 40) -> str:
    """A document of `paragraphs` distinct paragraphs (each about one chunk)."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return "\n\n".join(
        f"Section {i}. " + " ".join(f"{words[(i + j) % 8]}{i}x{j}" for j in range(150))
        for i in range(paragraphs)
    )


async def start_work(
    server: AppServer, reader: AppServer, redis: Redis, account: dict[str, Any]
) -> tuple[str, str, str, RunWatcher]:
    """Starts an answer and an ingestion on `server`, with a client reading the answer
    through `reader`; returns (conversation, run, job, the client) once both are under way."""
    token = await sign_in(server.http_url, account)
    conversation, run_id = await send_message(server.http_url, token, "tell me a long story")
    job_id = await ingest(server.http_url, token, document_text(20), f"{uuid.uuid4()}.txt")
    watcher = RunWatcher(reader.ws_url, token, run_id)
    await until(lambda: watcher.tokens() >= 5, "part of the answer streamed")

    async def embedding() -> bool:
        last = await job_log(redis).last(job_id)
        return last is not None and last.data.get("done", 0) > 0

    await until(embedding, "part of the document embedded")
    return conversation, run_id, job_id, watcher


async def assert_job_whole(
    database: Database, redis: Redis, account: dict[str, Any], job_id: str
) -> list[RunEvent]:
    """The job ended with its whole document, in its row and in its stream; returns the
    stream's events."""
    events = await events_of(job_log(redis), job_id)
    assert events[-1].type == "IngestionCompleted", [(e.type, e.data) for e in events[-3:]]
    async with database.session(account["tenant_id"]) as session:
        job = await session.get(IngestionJob, uuid.UUID(job_id))
        assert job is not None
        assert (job.status, job.error_code) == ("completed", None)
        assert job.done == job.total > 0
        assert await session.get(IngestionUpload, job.id) is None  # dropped with the job's end
        document = await session.get(Document, job.document_id)
        assert document is not None
        chunks = await session.scalar(
            select(func.count()).select_from(Chunk).where(Chunk.document_id == document.id)
        )
        assert document.chunk_count == chunks == job.total  # whole, never half-written
    return events


async def stored_answer(
    database: Database, account: dict[str, Any], run_id: str
) -> tuple[Run, Message]:
    async with database.session(account["tenant_id"]) as session:
        run = await session.get(Run, uuid.UUID(run_id))
        assert run is not None
        answer = await session.scalar(
            select(Message).where(Message.run_id == run.id, Message.role == MessageRole.ASSISTANT)
        )
        assert answer is not None, "the answer was lost"
    return run, answer


async def chat_again(server: AppServer, account: dict[str, Any], conversation: str) -> None:
    """The user is not locked out (one active run allowed): the conversation goes on."""
    token = await sign_in(server.http_url, account)
    _, run_id = await send_message(server.http_url, token, "and then", conversation)
    for attempt in range(3):
        try:
            last = await RunWatcher(server.ws_url, token, run_id).ended()
            break
        except AssertionError as refused:
            # Seen once in CI, right after a Redis outage: the subscription refused with the
            # typed, retryable SERVICE_UNAVAILABLE. A client tries again after `retryAfter`;
            # being refused every time is being locked out. The log says what was busy.
            if "SERVICE_UNAVAILABLE" not in str(refused) or attempt == 2:
                raise
            print(f"-- SERVICE_UNAVAILABLE on subscribing, trying again:\n{server.log()}")
            await asyncio.sleep(1)
    # a failure says why in the server's log (seen once in CI: RunFailed SERVICE_UNAVAILABLE)
    assert last["__typename"] == "RunCompleted", f"{last}\n{server.log()}"
