"""The chunk budget and the micro-batcher that let small ingestion jobs share work."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from backend.knowledge.batching import ChunkBudget, MicroBatcher


async def test_the_budget_counts_chunks_first_come_first_served() -> None:
    budget = ChunkBudget(10)
    order: list[str] = []

    async def job(name: str, chunks: int, hold: asyncio.Event) -> None:
        async with budget.hold(chunks):
            order.append(name)
            await hold.wait()

    release = asyncio.Event()
    small = [asyncio.create_task(job(f"s{i}", 3, release)) for i in range(3)]  # 9 of 10
    await asyncio.sleep(0.01)
    large = asyncio.create_task(job("large", 50, asyncio.Event()))  # takes all 10, waits
    late = asyncio.create_task(job("late", 1, release))  # fits, but comes after the large one
    await asyncio.sleep(0.01)
    assert order == ["s0", "s1", "s2"]
    large.cancel()  # a waiter that gives up leaves the queue: the next one gets its turn
    await asyncio.sleep(0.01)
    assert order == ["s0", "s1", "s2", "late"]
    release.set()
    await asyncio.gather(*small, late)
    with pytest.raises(asyncio.CancelledError):
        await large
    async with budget.hold(10):  # everything was given back
        pass


async def test_the_batcher_writes_items_together_and_each_hears_its_own_outcome() -> None:
    written: list[list[int]] = []

    async def flush(key: Hashable, items: list[int]) -> list[int | BaseException]:
        written.append(items)
        return [ValueError(i) if i < 0 else i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(flush, delay_s=0.05, max_weight=100)
    results = await asyncio.gather(
        *(batcher.submit("tenant", i) for i in (1, 2, -3, 4)), return_exceptions=True
    )
    assert results[0] == 10
    assert results[1] == 20
    assert results[3] == 40
    assert isinstance(results[2], ValueError)
    assert written == [[1, 2, -3, 4]]  # one write for all four

    # full before the delay: written at once; a waiter cancelled before its batch leaves it
    waiting = asyncio.create_task(batcher.submit("tenant", 5))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    assert await batcher.submit("tenant", 6, weight=100) == 60
    assert written[-1] == [6]
    await batcher.aclose()
    with pytest.raises(RuntimeError):
        await batcher.submit("tenant", 7)


async def test_closing_the_batcher_fails_what_waits_and_stops_what_is_written() -> None:
    started = asyncio.Event()

    async def flush(key: Hashable, items: list[int]) -> list[int]:
        started.set()
        await asyncio.sleep(3600)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(flush, delay_s=60, max_weight=1)
    writing = asyncio.create_task(batcher.submit("a", 1))
    await started.wait()
    queued = asyncio.create_task(batcher.submit("b", 2, weight=0))  # waits out its minute
    await asyncio.sleep(0)
    await batcher.aclose()
    for task in (writing, queued):  # nobody is left waiting
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(task, 5)
