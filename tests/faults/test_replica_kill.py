"""A server process killed with SIGKILL in the middle of a chat answer and of an ingestion job:
the answer streamed so far is kept (complete: false), the job is finished by another replica
(or by the same one, restarted), every stream ends, nothing stays held or locked."""

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
    KEY_PREFIX,
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

PARAGRAPHS = 20


async def interrupt_mid_work(
    server: AppServer, reader: AppServer, redis: Redis, account: dict[str, Any]
) -> tuple[str, str, str, RunWatcher]:
    """Starts an answer and an ingestion on `server`, a client reading the answer through
    `reader`; kills `server` once both are under way."""
    token = await sign_in(server.http_url, account)
    conversation, run_id = await send_message(server.http_url, token, "tell me a long story")
    job_id = await ingest(server.http_url, token, document_text(PARAGRAPHS), f"{uuid.uuid4()}.txt")
    watcher = RunWatcher(reader.ws_url, token, run_id)
    await until(lambda: watcher.tokens() >= 5, "part of the answer streamed")

    async def embedding() -> bool:
        last = await job_log(redis).last(job_id)
        return last is not None and last.data.get("done", 0) > 0

    await until(embedding, "part of the document embedded")
    await server.kill()
    return conversation, run_id, job_id, watcher


async def assert_nothing_lost(
    database: Database,
    redis: Redis,
    account: dict[str, Any],
    run_id: str,
    job_id: str,
    watcher: RunWatcher,
) -> None:
    # The subscriber is not left hanging: its stream ends, as WORKER_LOST.
    last = await watcher.ended()
    assert last["__typename"] == "RunFailed", watcher.events[-3:]
    assert last["code"] == "WORKER_LOST"
    streamed = watcher.text()
    assert streamed
    # The job is finished from its stored upload; its stream ends with it.
    events = await events_of(job_log(redis), job_id)
    assert events[-1].type == "IngestionCompleted", [e.type for e in events]
    assert any(e.data.get("status") == "resumed" for e in events)
    async with database.session(account["tenant_id"]) as session:
        run = await session.get(Run, uuid.UUID(run_id))
        assert run is not None
        assert (run.status, run.error_code) == (RunStatus.FAILED, "WORKER_LOST")
        answer = await session.scalar(
            select(Message).where(Message.run_id == run.id, Message.role == MessageRole.ASSISTANT)
        )
        assert answer is not None, "the partial answer was lost"
        assert (answer.content, answer.complete) == (streamed, False)
        job = await session.get(IngestionJob, uuid.UUID(job_id))
        assert job is not None
        assert job.status == "completed"
        assert job.done == job.total > 0
        assert await session.get(IngestionUpload, job.id) is None
        document = await session.get(Document, job.document_id)
        assert document is not None
        chunks = await session.scalar(
            select(func.count()).select_from(Chunk).where(Chunk.document_id == document.id)
        )
        assert document.chunk_count == chunks == job.total  # whole, never half-written
    # Nothing stays held on the budgets, no run stays active.
    held = [k async for k in redis.scan_iter(match=f"{KEY_PREFIX}budget:*:held")]
    assert held, "no reservation was ever made"
    assert [float(v or 0) for v in await redis.mget(held)] == [0.0] * len(held)
    assert await redis.smembers(f"{KEY_PREFIX}runs:active:{account['user_id']}") == set()


async def chat_again(server: AppServer, account: dict[str, Any], conversation: str) -> None:
    """The user is not locked out (one active run allowed): the conversation goes on."""
    token = await sign_in(server.http_url, account)
    _, run_id = await send_message(server.http_url, token, "and then", conversation)
    last = await RunWatcher(server.ws_url, token, run_id).ended()
    assert last["__typename"] == "RunCompleted", last


async def test_another_replica_keeps_the_answer_and_finishes_the_job(
    tmp_path: Path,
    postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    redis: Redis,
    stubs: tuple[Stubs, str],
    account: dict[str, Any],
    database: Database,
) -> None:
    stub, stubs_url = stubs
    stub.embedding_delay_s = 0.25
    environment = server_environment(
        database_url=postgres.url, redis_url=private_redis.url, stubs_url=stubs_url
    )
    doomed = AppServer(tmp_path / "doomed", environment)
    survivor = AppServer(tmp_path / "survivor", environment)
    doomed.start()
    survivor.start()
    try:
        await asyncio.gather(doomed.ready(), survivor.ready())
        conversation, run_id, job_id, watcher = await interrupt_mid_work(
            doomed, survivor, redis, account
        )
        await assert_nothing_lost(database, redis, account, run_id, job_id, watcher)
        await chat_again(survivor, account, conversation)
    except BaseException:
        print("doomed:", doomed.log(), "survivor:", survivor.log(), sep="\n")
        raise
    finally:
        await asyncio.gather(doomed.stop(), survivor.stop())


async def test_a_lone_server_restarted_recovers_its_own_work(
    tmp_path: Path,
    postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    redis: Redis,
    stubs: tuple[Stubs, str],
    account: dict[str, Any],
    database: Database,
) -> None:
    stub, stubs_url = stubs
    stub.embedding_delay_s = 0.25
    environment = server_environment(
        database_url=postgres.url, redis_url=private_redis.url, stubs_url=stubs_url
    )
    server = AppServer(tmp_path / "first-life", environment)
    server.start()
    restarted = AppServer(tmp_path / "second-life", environment)
    try:
        await server.ready()
        conversation, run_id, job_id, watcher = await interrupt_mid_work(
            server, server, redis, account
        )
        # its socket went down with the server
        await asyncio.wait_for(asyncio.gather(watcher.task, return_exceptions=True), 60)
        restarted.start()
        await restarted.ready()
        token = await sign_in(restarted.http_url, account)
        watcher = RunWatcher(restarted.ws_url, token, run_id)  # the client resubscribes
        await assert_nothing_lost(database, redis, account, run_id, job_id, watcher)
        await chat_again(restarted, account, conversation)
    except BaseException:
        print("first life:", server.log(), "second life:", restarted.log(), sep="\n")
        raise
    finally:
        await asyncio.gather(server.stop(), restarted.stop())
