"""How batches reach the pool's workers (backend/inference/_transport.py), with real worker
processes: arrays through the shared-memory slab answer as through the pipe; other inputs, and
batches over the slab, take the pipe; no slab outlives its pool or its worker; and a pipe
write that cannot finish does not hold up the event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.inference._transport import slab_prefix
from backend.inference.client import WorkerLost
from backend.inference.pool import InferencePool
from tests.inference.test_pool import toy

TIME_SCALE = float(os.environ.get("SIGHTLINE_TEST_TIME_SCALE", "1"))
SHM = Path("/dev/shm")

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm to look for slabs in")


def slabs() -> set[str]:
    """The names of the slabs this process's pools hold."""
    return {p.name for p in SHM.glob(f"{slab_prefix()}*")}


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., Any]]:
    started: list[InferencePool] = []

    async def start(
        *, slab_bytes: int = 64 * 2**20, max_delay_ms: float = 200, in_flight: int = 1
    ) -> InferencePool:
        manifest = toy("sum", "checksum", max_batch=8, max_delay_ms=max_delay_ms)
        pool = InferencePool([manifest], slab_bytes=slab_bytes, in_flight=in_flight)
        started.append(pool)
        await pool.start()
        await pool.wait_ready(60 * TIME_SCALE)
        return pool

    yield start
    for pool in started:
        await pool.close()


async def batch(pool: InferencePool, inputs: list[Any]) -> list[dict[str, Any]]:
    """The inputs as one batch (concurrent single-item requests, as clients send them)."""
    answers = await asyncio.gather(*(pool.infer("sum", [x]) for x in inputs))
    return [answer[0] for answer in answers]


def images(count: int, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


async def test_arrays_through_the_slab_answer_as_through_the_pipe(
    pools: Callable[..., Any],
) -> None:
    slab, pipe = await pools(), await pools(slab_bytes=0)
    inputs = images(8)
    through_slab, through_pipe = await batch(slab, inputs), await batch(pipe, inputs)
    assert [a["via_slab"] for a in through_slab] == [True] * 8
    assert [a["via_slab"] for a in through_pipe] == [False] * 8
    strip = [{k: v for k, v in a.items() if k not in ("via_slab", "pid")} for a in through_slab]
    assert strip == [
        {k: v for k, v in a.items() if k not in ("via_slab", "pid")} for a in through_pipe
    ]
    assert [a["sum"] for a in through_slab] == [float(x.astype(np.float64).sum()) for x in inputs]
    # the slab takes batch after batch (each one's reply frees it)
    again = await batch(slab, images(8, seed=1))
    assert [a["via_slab"] for a in again] == [True] * 8
    assert [a["sum"] for a in again] == [
        float(x.astype(np.float64).sum()) for x in images(8, seed=1)
    ]


async def test_other_inputs_and_batches_over_the_slab_take_the_pipe(
    pools: Callable[..., Any],
) -> None:
    pool = await pools(slab_bytes=64 * 1024)
    odd: list[Any] = [
        np.ones((2, 2), np.float32),
        np.ones((3, 3), np.float32),  # another shape
        np.ones((2, 2), np.uint8),  # another dtype
        {"image": np.full((2, 2), 2, np.uint8)},  # a detector's request
        5,
    ]
    answers = await batch(pool, odd)
    assert [a["sum"] for a in answers] == [4.0, 9.0, 4.0, 8.0, 5.0]
    assert [a["shape"] for a in answers] == [(2, 2), (3, 3), (2, 2), (2, 2), ()]
    assert not any(a["via_slab"] for a in answers)
    big = images(8, shape=(3, 64, 64))  # 48 KiB each: 384 KiB, over the 64 KiB slab
    answers = await batch(pool, big)
    assert not any(a["via_slab"] for a in answers)
    assert [a["sum"] for a in answers] == [float(x.astype(np.float64).sum()) for x in big]
    small = images(4, shape=(3, 32, 32))  # 48 KiB in all: fits
    answers = await batch(pool, small)
    assert all(a["via_slab"] for a in answers)
    assert [a["sum"] for a in answers] == [float(x.astype(np.float64).sum()) for x in small]


async def test_no_slab_outlives_its_worker_or_its_pool(pools: Callable[..., Any]) -> None:
    before = slabs()
    pool = await pools()
    [first] = slabs() - before
    assert all(a["via_slab"] for a in await batch(pool, images(4)))
    killer = images(4)
    killer[2][0, 0, 0] = -1  # the worker dies with this batch in its slab
    with pytest.raises(WorkerLost):
        await batch(pool, killer)
    assert first not in slabs()  # freed with its worker
    # the replacement has a slab of its own
    answers = await asyncio.wait_for(batch(pool, images(4)), 60 * TIME_SCALE)
    assert all(a["via_slab"] for a in answers)
    [second] = slabs() - before
    assert second != first
    os.kill(answers[0]["pid"], signal.SIGKILL)  # killed from outside, while idle
    async with asyncio.timeout(30 * TIME_SCALE):
        while second in slabs():
            await asyncio.sleep(0.01)
    await pool.close()
    assert slabs() == before


async def test_a_worker_with_two_batches_in_flight_has_a_segment_for_each(
    pools: Callable[..., Any],
) -> None:
    before = slabs()
    pool = await pools(in_flight=2, max_delay_ms=0)
    assert len(slabs() - before) == 2
    requests = [images(8, seed=seed) for seed in range(6)]
    answers = await asyncio.gather(*(pool.infer("sum", inputs) for inputs in requests))
    for inputs, answer in zip(requests, answers, strict=True):
        assert [a["sum"] for a in answer] == [float(x.astype(np.float64).sum()) for x in inputs]
    assert sum(a["via_slab"] for answer in answers for a in answer) >= 8
    await pool.close()
    assert slabs() == before


async def test_the_event_loop_runs_while_a_worker_does_not_read(
    pools: Callable[..., Any],
) -> None:
    pool = await pools(slab_bytes=0, max_delay_ms=0)  # the pipe: its write blocks till read
    [probe] = await batch(pool, images(1))
    worker = probe["pid"]
    resumed = threading.Event()

    def resume() -> None:  # a safety net: a blocked loop could not resume the worker itself
        os.kill(worker, signal.SIGCONT)
        resumed.set()

    os.kill(worker, signal.SIGSTOP)
    timer = threading.Timer(10 * TIME_SCALE, resume)
    timer.start()
    try:
        big = images(8, shape=(3, 256, 256))  # 6 MiB: far more than a pipe's buffer
        answer = asyncio.ensure_future(batch(pool, big))
        ticks = 0
        while ticks < 20:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not resumed.is_set(), "the event loop stood still while the pipe was full"
        assert not answer.done()
    finally:
        timer.cancel()
        resume()
    answers = await asyncio.wait_for(answer, 60 * TIME_SCALE)
    assert [a["sum"] for a in answers] == [float(x.astype(np.float64).sum()) for x in big]
