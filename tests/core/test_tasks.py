"""Owned tasks end when their owner closes them, even when a cancellation is lost."""

from __future__ import annotations

import asyncio

from backend.core.tasks import cancel_and_wait, drain
from tests.conftest import scaled


async def _swallows_one_cancel(stopped: list[str]) -> None:
    """A loop that catches what a lost cancellation turns into (redis-py on Python 3.11 was
    seen to make a TimeoutError of one mid-command) and carries on."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                stopped.append("cancelled")
                raise
            swallowed = True
            asyncio.current_task().uncancel()  # type: ignore[union-attr]


async def test_a_lost_cancellation_is_sent_again() -> None:
    stopped: list[str] = []
    task = asyncio.create_task(_swallows_one_cancel(stopped))
    await asyncio.sleep(0)
    async with asyncio.timeout(scaled(30)):
        await cancel_and_wait([task], again_after_s=0.05)
    assert task.cancelled()
    assert stopped == ["cancelled"]


async def test_a_failed_task_does_not_stop_the_others_from_ending() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    sleeping = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    await cancel_and_wait([failed, sleeping])
    assert isinstance(failed.exception(), RuntimeError)
    assert sleeping.cancelled()


async def test_drain_lets_work_finish_then_cancels_the_rest() -> None:
    quick = asyncio.create_task(asyncio.sleep(0.01))
    stopped: list[str] = []
    stuck = asyncio.create_task(_swallows_one_cancel(stopped))
    async with asyncio.timeout(scaled(60)):
        await drain([quick, stuck], grace_s=0.2, again_after_s=0.05)
    assert quick.done()
    assert not quick.cancelled()
    assert stuck.cancelled()
    assert stopped == ["cancelled"]
