"""Per-version serving figures: added up across replicas in Redis, read over a window."""

from __future__ import annotations

import asyncio
import bisect

import pytest
from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.redis import KeySpace
from backend.lifecycle._series import Series
from backend.lifecycle.stats import LATENCY_BOUNDS, ServingStats, percentile
from tests.conftest import scaled


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_percentiles_interpolate_inside_the_bucket() -> None:
    counts = [0.0] * (len(LATENCY_BOUNDS) + 1)
    assert percentile(counts, 0.5) is None
    slot = bisect.bisect_left(LATENCY_BOUNDS, 0.1)
    low, high = LATENCY_BOUNDS[slot - 1], LATENCY_BOUNDS[slot]
    assert high / low == pytest.approx(1.25, rel=0.01)
    counts[slot] = 10
    assert percentile(counts, 0.5) == pytest.approx((low + high) / 2)
    counts[-1] = 90  # beyond the last bound: that bound is all that is known
    assert percentile(counts, 0.95) == LATENCY_BOUNDS[-1]
    assert low < percentile(counts, 0.05) <= high  # type: ignore[operator]


async def test_two_replicas_add_up_in_one_window(
    redis: Redis, key_prefix: str, lifecycle_settings: LifecycleSettings
) -> None:
    clock = Clock()
    replicas = [
        Series(redis, KeySpace(key_prefix), lifecycle_settings, clock=clock) for _ in range(2)
    ]
    a, b = (ServingStats(s) for s in replicas)
    for _ in range(90):
        a.record("ocr", "1", ok=True, latency_s=0.010, compute_s=0.01, cost=0.001)
    for i in range(10):
        b.record("ocr", "1", ok=i % 2 == 0, latency_s=1.0, compute_s=0.5, cost=0.002)
    b.record("ocr", "2", ok=False, latency_s=5.0)
    b.record("chat", "1", ok=True, latency_s=0.2, tokens=42, cost=0.5)
    for series in replicas:
        await series.flush()

    seen = await ServingStats(replicas[1]).window("ocr", "1", 60)
    assert (seen.requests, seen.errors) == (100, 5)
    assert seen.error_rate == pytest.approx(0.05)
    # within the latency bucket of the true value (bounds 1.25x apart)
    assert seen.p50_s == pytest.approx(0.010, rel=0.25)
    assert seen.p95_s == pytest.approx(1.0, rel=0.25)
    assert seen.compute_s == pytest.approx(0.9 + 5.0)
    assert seen.cost == pytest.approx(0.09 + 0.02)
    assert (await a.window("ocr", "2", 60)).errors == 1
    chat = await a.window("chat", "1", 60)
    assert (chat.tokens, chat.cost) == (42, pytest.approx(0.5))
    assert (await a.window("ocr", "3", 60)).requests == 0

    # the buckets expire after the retention; a window reads only its own buckets
    keys = [key async for key in redis.scan_iter(match=f"{key_prefix}lifecycle:*")]
    assert keys
    ttls = [await redis.ttl(key) for key in keys]
    assert all(0 < ttl <= lifecycle_settings.stats_retention_s + 10 for ttl in ttls)
    clock.now += 120
    assert (await a.window("ocr", "1", 60)).requests == 0
    assert (await a.window("ocr", "1", 300)).requests == 100


async def test_a_replica_reads_its_own_unflushed_figures(stats: ServingStats) -> None:
    stats.record("detect", "1", ok=False, latency_s=0.3)
    assert (await stats.window("detect", "1", 30)).errors == 1


async def test_model_names_never_share_a_series(stats: ServingStats, series: Series) -> None:
    stats.record("a:b", "c", ok=True, latency_s=0.1)
    stats.record("a", "b:c", ok=True, latency_s=0.1)
    await series.flush()
    assert (await stats.window("a:b", "c", 30)).requests == 1
    assert (await stats.window("a", "b:c", 30)).requests == 1


async def test_a_redis_outage_costs_figures_not_requests(key_prefix: str) -> None:
    """Recording never waits on Redis; a failed flush is logged, and the loop goes on."""
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    settings = LifecycleSettings(stats_flush_interval_s=0.05, stats_flush_timeout_s=0.5)
    series = Series(dead, KeySpace(key_prefix), settings)
    series.start()
    try:
        stats = ServingStats(series)
        for _ in range(1000):
            stats.record("ocr", "1", ok=True, latency_s=0.01)
        await asyncio.sleep(scaled(0.5))
        stats.record("ocr", "1", ok=True, latency_s=0.01)
        assert series.running
    finally:
        await series.close()
        await dead.aclose()


async def test_the_pending_figures_are_bounded(redis: Redis, key_prefix: str) -> None:
    series = Series(redis, KeySpace(key_prefix), LifecycleSettings(stats_max_pending=2))
    stats = ServingStats(series)
    for version in ("1", "2", "3"):
        stats.record("ocr", version, ok=True, latency_s=0.01)
    await series.flush()
    assert [(await stats.window("ocr", v, 30)).requests for v in ("1", "2", "3")] == [1, 1, 0]


async def test_a_read_during_a_flush_counts_the_figures_once(
    redis: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush has taken the figures from memory and its write has not reached Redis yet:
    a read then must find them once: not in neither place, not in both."""
    series = Series(redis, KeySpace(key_prefix), LifecycleSettings())
    series.add(("s",), {"n": 1})
    gate = asyncio.Event()
    pipeline = type(redis.pipeline())
    execute = pipeline.execute

    async def held(self: object, *args: object, **kwargs: object) -> object:
        if self.is_transaction:  # type: ignore[attr-defined]  # the flush's write
            await gate.wait()
        return await execute(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "execute", held)
    flushing = asyncio.create_task(series.flush())
    for _ in range(5):
        await asyncio.sleep(0)  # the flush has taken the figures and waits to write them
    reading = asyncio.create_task(series.read(("s",), 60))
    await asyncio.sleep(0.05)
    gate.set()
    async with asyncio.timeout(scaled(10)):
        await flushing
        assert (await reading).get("n") == 1
    assert (await series.read(("s",), 60)).get("n") == 1
