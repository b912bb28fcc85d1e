"""A chat run across two replicas: streamed from the one it was not started on, cancelled from
there, and resumed there from the last cursor a client saw when its own replica was killed."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from backend.core.db import Database
from backend.core.models import Run, RunStatus
from tests.faults.conftest import RunWatcher, gql, send_message, sign_in, stored_answer, until
from tests.faults.servers import AppServer, Stubs

pytestmark = [pytest.mark.scale, pytest.mark.timeout(600)]

CANCEL = "mutation($r: ID!) { cancelRun(runId: $r) { status } }"


async def run_row(database: Database, account: dict[str, Any], run_id: str) -> Run:
    async with database.session(account["tenant_id"]) as session:
        run = await session.scalar(select(Run).where(Run.id == uuid.UUID(run_id)))
        assert run is not None
        return run


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["__typename"] == "TokenDelta")


def assert_whole(events: list[dict[str, Any]]) -> None:
    """No event twice and no token missing. A reader that falls behind gets consecutive deltas
    merged (`index` is the last token's), and the stub answers one word per token."""
    cursors = [e["cursor"] for e in events]
    assert len(set(cursors)) == len(cursors), cursors
    indices = [e["index"] for e in events if e["__typename"] == "TokenDelta"]
    assert indices == sorted(set(indices)), indices
    assert len(text_of(events).split()) == indices[-1] + 1, (indices, text_of(events))


async def test_a_run_started_on_a_streams_from_b_and_a_cancel_sent_to_b_stops_it_on_a(
    replicas: tuple[AppServer, AppServer],
    stubs: tuple[Stubs, str],
    account: dict[str, Any],
    database: Database,
) -> None:
    a, b = replicas
    stub, _ = stubs
    token = await sign_in(a.http_url, account)
    _, run_id = await send_message(a.http_url, token, "tell me a long story")
    watcher = RunWatcher(b.ws_url, token, run_id)  # a client of the other replica
    await until(lambda: watcher.tokens() >= 5, "part of the answer streamed through B")
    assert stub.llm.open_streams == 1  # A's model call

    cancelled = await gql(b.http_url, token, CANCEL, r=run_id)
    assert "errors" not in cancelled, cancelled
    assert cancelled["data"]["cancelRun"]["status"] in {"CANCELLED", "CANCELLING"}
    last = await watcher.ended()
    assert last["__typename"] == "RunCancelled", watcher.events[-3:]
    assert_whole(watcher.events)
    assert watcher.tokens() < 60  # stopped before the end of the answer
    # A stopped its model call (the stub saw its stream closed early), and the run is over
    await until(lambda: stub.llm.open_streams == 0, "A closed its model call")
    assert stub.llm.closed_early == 1
    assert (await run_row(database, account, run_id)).status == RunStatus.CANCELLED
    assert a.alive()  # A itself goes on


async def test_a_run_of_a_killed_replica_ends_worker_lost_and_resumes_on_b_from_the_cursor(
    replicas: tuple[AppServer, AppServer],
    account: dict[str, Any],
    database: Database,
) -> None:
    """tests/faults/test_replica_kill.py covers the run's and the job's end with a client that
    watched from the survivor all along; here the client watched the replica that dies and
    resumes on the other with `after:` its last cursor."""
    a, b = replicas
    token = await sign_in(a.http_url, account)
    _, run_id = await send_message(a.http_url, token, "tell me a long story")
    on_a = RunWatcher(a.ws_url, token, run_id)
    await until(lambda: on_a.tokens() >= 5, "part of the answer streamed through A")
    await a.kill()
    # the client's socket went down with A
    await asyncio.wait_for(asyncio.gather(on_a.task, return_exceptions=True), 60)
    seen = list(on_a.events)
    assert seen

    on_b = RunWatcher(b.ws_url, token, run_id, after=seen[-1]["cursor"])
    last = await on_b.ended()
    assert (last["__typename"], last["code"]) == ("RunFailed", "WORKER_LOST"), on_b.events[-3:]
    both = seen + on_b.events
    assert_whole(both)
    # exactly the run's log: a reader from the start on B reads the same (its deltas merged)
    whole = RunWatcher(b.ws_url, token, run_id)
    assert (await whole.ended())["cursor"] == both[-1]["cursor"]
    assert whole.text() == text_of(both)

    run, answer = await stored_answer(database, account, run_id)
    assert (run.status, run.error_code) == (RunStatus.FAILED, "WORKER_LOST")
    assert (answer.content, answer.complete) == (text_of(both), False)  # all that streamed, kept
