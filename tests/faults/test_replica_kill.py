"""A server process killed with SIGKILL in the middle of a chat answer and of an ingestion job:
the answer streamed so far is kept (complete: false), the job is finished by another replica
(or by the same one, restarted), every stream ends, nothing stays held or locked."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from backend.core.db import Database
from backend.core.models import RunStatus
from tests.faults.conftest import (
    KEY_PREFIX,
    RunWatcher,
    assert_job_whole,
    chat_again,
    sign_in,
    start_work,
    stored_answer,
)
from tests.faults.servers import AppServer, serving

pytestmark = pytest.mark.timeout(900)


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
    assert watcher.text()
    run, answer = await stored_answer(database, account, run_id)
    assert (run.status, run.error_code) == (RunStatus.FAILED, "WORKER_LOST")
    assert (answer.content, answer.complete) == (watcher.text(), False)  # all that streamed
    # The job is finished from its stored upload; its stream ends with it.
    events = await assert_job_whole(database, redis, account, job_id)
    assert any(e.data.get("status") == "resumed" for e in events)
    # Nothing stays held on the budgets, no run stays active.
    held = [k async for k in redis.scan_iter(match=f"{KEY_PREFIX}budget:*:held")]
    assert held, "no reservation was ever made"
    assert [float(v or 0) for v in await redis.mget(held)] == [0.0] * len(held)
    assert await redis.smembers(f"{KEY_PREFIX}runs:active:{account['user_id']}") == set()


async def test_another_replica_keeps_the_answer_and_finishes_the_job(
    tmp_path: Path,
    environment: dict[str, str],
    redis: Redis,
    account: dict[str, Any],
    database: Database,
) -> None:
    doomed = AppServer(tmp_path / "doomed", environment)
    survivor = AppServer(tmp_path / "survivor", environment)
    async with serving(doomed, survivor):
        conversation, run_id, job_id, watcher = await start_work(doomed, survivor, redis, account)
        await doomed.kill()
        await assert_nothing_lost(database, redis, account, run_id, job_id, watcher)
        await chat_again(survivor, account, conversation)


async def test_a_lone_server_restarted_recovers_its_own_work(
    tmp_path: Path,
    environment: dict[str, str],
    redis: Redis,
    account: dict[str, Any],
    database: Database,
) -> None:
    first_life = AppServer(tmp_path / "first-life", environment)
    async with serving(first_life):
        conversation, run_id, job_id, watcher = await start_work(
            first_life, first_life, redis, account
        )
        await first_life.kill()
        # its client's socket went down with it
        await asyncio.wait_for(asyncio.gather(watcher.task, return_exceptions=True), 60)
    second_life = AppServer(tmp_path / "second-life", environment)
    async with serving(second_life):
        token = await sign_in(second_life.http_url, account)
        watcher = RunWatcher(second_life.ws_url, token, run_id)  # the client subscribes again
        await assert_nothing_lost(database, redis, account, run_id, job_id, watcher)
        await chat_again(second_life, account, conversation)
