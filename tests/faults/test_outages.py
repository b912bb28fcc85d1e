"""Redis and PostgreSQL stopped for several seconds and started again under a live answer and
a live ingestion: no run is failed, no job is failed or restarted, nothing is lost, and every
stream ends (the old servers failed the run as WORKER_LOST and the job as FAILED)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from backend.core.db import Database
from backend.core.models import (
    Chunk,
    Document,
    IngestionJob,
    IngestionUpload,
    Message,
    MessageRole,
    Run,
    RunStatus,
)
from tests.faults.conftest import (
    RunWatcher,
    document_text,
    events_of,
    ingest,
    job_log,
    send_message,
    sign_in,
    until,
)
from tests.faults.servers import AppServer, PrivatePostgres, PrivateRedis, Stubs, server_environment

pytestmark = pytest.mark.timeout(900)

ANSWER_TOKENS = 60
OUTAGE_S = 8.0  # longer than a lease and its grace (1 s + 3 s): long enough to look dead


async def start_work(
    server: AppServer, reader: AppServer, redis: Redis, account: dict[str, Any]
) -> tuple[str, str, str, RunWatcher]:
    token = await sign_in(server.http_url, account)
    conversation, run_id = await send_message(server.http_url, token, "count with me please")
    job_id = await ingest(server.http_url, token, document_text(20), f"{uuid.uuid4()}.txt")
    watcher = RunWatcher(reader.ws_url, token, run_id)
    await until(lambda: watcher.tokens() >= 5, "part of the answer streamed")

    async def embedding() -> bool:
        last = await job_log(redis).last(job_id)
        return last is not None and last.data.get("done", 0) > 0

    await until(embedding, "part of the document embedded")
    return conversation, run_id, job_id, watcher


async def assert_all_done(
    database: Database,
    redis: Redis,
    account: dict[str, Any],
    run_id: str,
    job_id: str,
    watcher: RunWatcher,
) -> None:
    last = await watcher.ended()
    assert last["__typename"] == "RunCompleted", watcher.events[-3:]
    deltas = [e for e in watcher.events if e["__typename"] == "TokenDelta"]
    assert [d["index"] for d in deltas] == sorted({d["index"] for d in deltas})  # no repeat
    assert deltas[-1]["index"] == ANSWER_TOKENS - 1
    assert len(watcher.text().split()) == ANSWER_TOKENS  # no gap
    events = await events_of(job_log(redis), job_id)
    assert events[-1].type == "IngestionCompleted", [(e.type, e.data) for e in events[-3:]]
    assert not any(e.data.get("status") == "resumed" for e in events)  # never taken for dead
    async with database.session(account["tenant_id"]) as session:
        run = await session.get(Run, uuid.UUID(run_id))
        assert run is not None
        assert run.status is RunStatus.COMPLETED
        answer = await session.scalar(
            select(Message).where(Message.run_id == run.id, Message.role == MessageRole.ASSISTANT)
        )
        assert answer is not None
        assert (answer.content, answer.complete) == (watcher.text(), True)
        job = await session.get(IngestionJob, uuid.UUID(job_id))
        assert job is not None
        assert (job.status, job.error_code) == ("completed", None)
        assert job.done == job.total > 0
        assert await session.get(IngestionUpload, job.id) is None
        document = await session.get(Document, job.document_id)
        assert document is not None
        chunks = await session.scalar(
            select(func.count()).select_from(Chunk).where(Chunk.document_id == document.id)
        )
        assert document.chunk_count == chunks == job.total


async def test_redis_stopped_and_restarted_fails_nothing(
    tmp_path: Path,
    postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    redis: Redis,
    stubs: tuple[Stubs, str],
    account: dict[str, Any],
    database: Database,
) -> None:
    stub, stubs_url = stubs
    stub.llm.answer_tokens = ANSWER_TOKENS
    stub.embedding_delay_s = 0.25
    environment = server_environment(
        database_url=postgres.url, redis_url=private_redis.url, stubs_url=stubs_url
    )
    writer = AppServer(tmp_path / "writer", environment)
    reader = AppServer(tmp_path / "reader", environment)
    writer.start()
    reader.start()
    try:
        await asyncio.gather(writer.ready(), reader.ready())
        conversation, run_id, job_id, watcher = await start_work(writer, reader, redis, account)
        await asyncio.to_thread(private_redis.stop)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(private_redis.start)
        await redis.connection_pool.disconnect()  # the test's own client: its sockets died
        await assert_all_done(database, redis, account, run_id, job_id, watcher)
        assert "retrying for up to" in writer.log(tail=None)  # the outage did reach the writes
        token = await sign_in(reader.http_url, account)  # and the user chats on
        _, again = await send_message(reader.http_url, token, "once more", conversation)
        assert (await RunWatcher(reader.ws_url, token, again).ended())["__typename"] == (
            "RunCompleted"
        )
    except BaseException:
        print("writer:", writer.log(), "reader:", reader.log(), sep="\n")
        raise
    finally:
        await asyncio.gather(writer.stop(), reader.stop())


async def test_postgres_stopped_and_restarted_loses_nothing(
    tmp_path: Path,
    postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    redis: Redis,
    stubs: tuple[Stubs, str],
    account: dict[str, Any],
    database: Database,
) -> None:
    stub, stubs_url = stubs
    stub.llm.answer_tokens = ANSWER_TOKENS
    stub.embedding_delay_s = 0.25
    environment = server_environment(
        database_url=postgres.url, redis_url=private_redis.url, stubs_url=stubs_url
    )
    server = AppServer(tmp_path / "server", environment)
    server.start()
    try:
        await server.ready()
        _, run_id, job_id, watcher = await start_work(server, server, redis, account)
        await asyncio.to_thread(postgres.stop)
        try:
            # the answer ends meanwhile and the document is embedded: both wait to be stored
            await asyncio.sleep(OUTAGE_S)
        finally:
            await asyncio.to_thread(postgres.start)
        await assert_all_done(database, redis, account, run_id, job_id, watcher)
        assert "retrying for up to" in server.log(tail=None)  # the outage did reach the writes
    except BaseException:
        print("server:", server.log(), sep="\n")
        raise
    finally:
        await server.stop()
