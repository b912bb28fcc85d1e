"""Redis and PostgreSQL stopped for several seconds and started again under a live answer and
a live ingestion: no run is failed, no job is failed or restarted, nothing is lost, and every
stream ends (the old servers failed the run as WORKER_LOST and the job as FAILED)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from backend.config import RedisSettings
from backend.core.db import Database
from backend.core.models import RunStatus
from backend.core.redis import connect_redis
from tests.faults.conftest import (
    ANSWER_TOKENS,
    RunWatcher,
    assert_job_whole,
    chat_again,
    start_work,
    stored_answer,
)
from tests.faults.servers import AppServer, PrivatePostgres, PrivateRedis, serving

pytestmark = pytest.mark.timeout(900)

OUTAGE_S = 8.0  # longer than a lease and its grace (1 s + 3 s): long enough to look dead


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
    run, answer = await stored_answer(database, account, run_id)
    assert run.status is RunStatus.COMPLETED
    assert (answer.content, answer.complete) == (watcher.text(), True)
    events = await assert_job_whole(database, redis, account, job_id)
    assert not any(e.data.get("status") == "resumed" for e in events)  # never taken for dead


async def test_redis_stopped_and_restarted_fails_nothing(
    tmp_path: Path,
    environment: dict[str, str],
    private_redis: PrivateRedis,
    redis: Redis,
    account: dict[str, Any],
    database: Database,
) -> None:
    writer = AppServer(tmp_path / "writer", environment)
    reader = AppServer(tmp_path / "reader", environment)
    async with serving(writer, reader):
        conversation, run_id, job_id, watcher = await start_work(writer, reader, redis, account)
        await asyncio.to_thread(private_redis.stop)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(private_redis.start)
        await redis.connection_pool.disconnect()  # the test's own client: its sockets died
        await assert_all_done(database, redis, account, run_id, job_id, watcher)
        assert "retrying for up to" in writer.log(tail=None)  # the outage did reach the writes
        await chat_again(reader, account, conversation)


async def test_postgres_stopped_and_restarted_loses_nothing(
    tmp_path: Path,
    environment: dict[str, str],
    postgres: PrivatePostgres,
    redis: Redis,
    account: dict[str, Any],
    database: Database,
) -> None:
    server = AppServer(tmp_path / "server", environment)
    async with serving(server):
        _, run_id, job_id, watcher = await start_work(server, server, redis, account)
        await asyncio.to_thread(postgres.stop)
        try:
            # the answer ends meanwhile and the document is embedded: both wait to be stored
            await asyncio.sleep(OUTAGE_S)
        finally:
            await asyncio.to_thread(postgres.start)
        await assert_all_done(database, redis, account, run_id, job_id, watcher)
        assert "retrying for up to" in server.log(tail=None)  # the outage did reach the writes


async def test_connections_idle_through_a_redis_restart_serve_the_next_commands(
    private_redis: PrivateRedis,
) -> None:
    """The pool the servers use hands out no connection Redis closed while it sat idle: each
    is opened again when taken. (redis-py 8 skips that check by default; every idle connection
    then failed its next command, a 503 to a sign-in seen in CI after an outage had ended.)"""
    client = connect_redis(private_redis.url, RedisSettings())
    try:
        # five connections at once, all back in the pool afterwards
        await asyncio.gather(*(client.blpop([f"nothing-{i}"], timeout=0.2) for i in range(5)))
        assert len(client.connection_pool._available_connections) == 5  # type: ignore[attr-defined]
        await asyncio.to_thread(private_redis.stop)
        await asyncio.to_thread(private_redis.start)
        assert [await client.incr("after-restart") for _ in range(5)] == [1, 2, 3, 4, 5]
    finally:
        await client.aclose()
