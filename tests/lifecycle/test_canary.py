"""The canary guard on real Redis figures: a canary that breaks its guard is rolled back by
itself, once across replicas; one within its guard, or with too few requests, is left alone."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.metrics import Metrics
from backend.core.redis import KeySpace
from backend.lifecycle._series import Series
from backend.lifecycle.canary import CanaryWatch, Outcome, judge
from backend.lifecycle.policy import Arm, CanaryGuard, TrafficPolicy
from backend.lifecycle.stats import ServingStats, VersionWindow
from tests.conftest import scaled
from tests.lifecycle.test_stats import Clock

GUARD = CanaryGuard(max_error_rate_delta=0.05, max_p95_ratio=1.5, min_requests=50, window_s=60)


def canary_policy(model: str = "ocr") -> TrafficPolicy:
    return TrafficPolicy(model=model, arms=(Arm("1", 75), Arm("2", 25)), canary=GUARD, revision=3)


class Registry:
    """What the registry service does for the guard: hold policies, roll one back to live."""

    def __init__(self, *policies: TrafficPolicy) -> None:
        self.held = {p.model: p for p in policies}
        self.rollbacks: list[tuple[str, str]] = []
        self.rolled_back = asyncio.Event()

    def policies(self) -> list[TrafficPolicy]:
        return list(self.held.values())

    async def ramp(self, model: str, version: str, weight: float) -> None:
        policy = self.held[model]
        arms = (
            (Arm(version, 100),)
            if weight >= 100
            else (Arm(policy.live, 100 - weight), Arm(version, weight))
        )
        self.held[model] = replace(policy, arms=arms, revision=policy.revision + 1)

    async def rollback(self, model: str, reason: str) -> None:
        policy = self.held[model]
        self.held[model] = replace(
            policy, arms=(Arm(policy.live, 100),), revision=policy.revision + 1
        )
        self.rollbacks.append((model, reason))
        self.rolled_back.set()


def window(version: str, requests: int, errors: int, p95: float) -> VersionWindow:
    return VersionWindow("ocr", version, 60, requests, errors, p95 / 2, p95, 0, 0.0, 0.0)


def test_the_verdicts() -> None:
    live = window("1", 100, 1, 0.1)
    assert judge(live, window("2", 49, 49, 9), GUARD).outcome is Outcome.UNDECIDED
    assert judge(live, window("2", 100, 5, 0.14), GUARD).outcome is Outcome.HEALTHY
    assert judge(live, window("2", 100, 7, 0.1), GUARD).outcome is Outcome.ERROR_RATE
    verdict = judge(live, window("2", 100, 1, 0.2), GUARD)
    assert verdict.outcome is Outcome.P95_LATENCY
    assert verdict.breached
    assert "200 ms" in verdict.detail


def serve(
    stats: ServingStats, version: str, n: int, *, fail_every: int = 0, s: float = 0.05
) -> None:
    for i in range(n):
        failed = fail_every > 0 and i % fail_every == 0
        stats.record("ocr", version, ok=not failed, latency_s=s, compute_s=s)


def watch(
    stats: ServingStats,
    registry: Registry,
    redis: Redis,
    key_prefix: str,
    metrics: Metrics,
    settings: LifecycleSettings | None = None,
    clock: Clock | None = None,
) -> CanaryWatch:
    return CanaryWatch(
        stats,
        registry,
        registry.rollback,
        redis=redis,
        keys=KeySpace(key_prefix),
        settings=settings or LifecycleSettings(),
        metrics=metrics,
        ramp=registry.ramp,
        clock=clock or Clock(),
    )


def rollbacks(metrics: Metrics, version: str, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "sightline_model_rollbacks_total", {"model": "ocr", "version": version, "reason": reason}
    )


async def test_a_canary_failing_half_its_requests_is_rolled_back_once(
    redis: Redis, key_prefix: str, lifecycle_settings: LifecycleSettings
) -> None:
    replicas = [Series(redis, KeySpace(key_prefix), lifecycle_settings) for _ in range(2)]
    a, b = (ServingStats(s) for s in replicas)
    serve(a, "1", 150)
    serve(b, "2", 30, fail_every=2)
    serve(a, "2", 30, fail_every=2)
    for series in replicas:
        await series.flush()
    registry, metrics = Registry(canary_policy()), Metrics()
    guards = [watch(s, registry, redis, key_prefix, metrics) for s in (a, b)]

    verdicts = [await g.check() for g in guards]  # both replicas tick: one acts
    assert sorted(len(v) for v in verdicts) == [0, 1]
    (verdict,) = verdicts[0] or verdicts[1]
    assert verdict.outcome is Outcome.ERROR_RATE
    assert verdict.version == "2"
    assert len(registry.rollbacks) == 1
    model, reason = registry.rollbacks[0]
    assert model == "ocr"
    assert "canary 2" in reason
    assert "50.0%" in reason
    assert registry.held["ocr"].arms == (Arm("1", 100),)
    assert rollbacks(metrics, "2", "error_rate") == 1

    # a replica whose snapshot has not heard of the rollback yet does not roll back again
    stale = Registry(canary_policy())
    await redis.delete(f"{key_prefix}lifecycle:canary:ocr")  # the next interval: its turn
    (late,) = await watch(a, stale, redis, key_prefix, metrics).check()
    assert late.breached
    assert stale.rollbacks == []
    assert rollbacks(metrics, "2", "error_rate") == 1
    await asyncio.gather(*(s.close() for s in replicas))


async def test_a_canary_within_its_guard_stays(
    stats: ServingStats, series: Series, redis: Redis, key_prefix: str
) -> None:
    serve(stats, "1", 100, fail_every=50)  # 2% errors
    serve(stats, "2", 60, fail_every=20)  # 5%: within live + 5 points
    await series.flush()
    registry, metrics = Registry(canary_policy()), Metrics()
    (verdict,) = await watch(stats, registry, redis, key_prefix, metrics).check()
    assert verdict.outcome is Outcome.HEALTHY
    assert registry.rollbacks == []
    assert rollbacks(metrics, "2", "error_rate") is None


async def test_too_few_requests_decide_nothing(
    stats: ServingStats, redis: Redis, key_prefix: str
) -> None:
    serve(stats, "1", 500)
    serve(stats, "2", 49, fail_every=1)  # every one failed, but 49 < min_requests
    registry = Registry(canary_policy())
    (verdict,) = await watch(stats, registry, redis, key_prefix, Metrics()).check()
    assert verdict.outcome is Outcome.UNDECIDED
    assert registry.rollbacks == []


async def test_a_slow_canary_is_rolled_back_by_the_periodic_guard(
    stats: ServingStats, redis: Redis, key_prefix: str
) -> None:
    serve(stats, "1", 60, s=0.05)
    serve(stats, "2", 60, s=0.5)
    unguarded = TrafficPolicy(model="other", arms=(Arm("1", 50), Arm("2", 50)))
    registry, metrics = Registry(canary_policy(), unguarded), Metrics()
    settings = LifecycleSettings(canary_interval_s=0.05)
    guard = watch(stats, registry, redis, key_prefix, metrics, settings)
    guard.start()
    try:
        await asyncio.wait_for(registry.rolled_back.wait(), scaled(10))
    finally:
        await guard.close()
    assert [m for m, _ in registry.rollbacks] == ["ocr"]
    assert rollbacks(metrics, "2", "p95_latency") == 1


async def test_the_guard_is_off_when_disabled(
    stats: ServingStats, redis: Redis, key_prefix: str
) -> None:
    registry = Registry(canary_policy())
    guard = watch(
        stats, registry, redis, key_prefix, Metrics(), LifecycleSettings(canary_enabled=False)
    )
    guard.start()
    assert not guard.running
    await guard.close()


@pytest.mark.parametrize("arms", [(Arm("1", 100),), (Arm("1", 100), Arm("2", 0))])
async def test_policies_without_a_canary_are_not_judged(
    stats: ServingStats, redis: Redis, key_prefix: str, arms: tuple[Arm, ...]
) -> None:
    registry = Registry(TrafficPolicy(model="ocr", arms=arms, canary=GUARD))
    assert await watch(stats, registry, redis, key_prefix, Metrics()).check() == []


async def test_a_healthy_canary_steps_up_its_ramp_after_each_clean_window(
    stats: ServingStats, redis: Redis, key_prefix: str
) -> None:
    guard = replace(GUARD, ramp=(5, 25, 50, 100))
    registry = Registry(TrafficPolicy(model="ocr", arms=(Arm("1", 95), Arm("2", 5)), canary=guard))
    serve(stats, "1", 100)
    serve(stats, "2", 60)
    clock = Clock()
    settings = LifecycleSettings(canary_interval_s=0.001)  # the replica's turn lasts 1 ms
    guard_job = watch(stats, registry, redis, key_prefix, Metrics(), settings, clock)

    async def tick() -> tuple[Arm, ...]:
        await asyncio.sleep(0.01)  # the turn of the pass before has passed
        await guard_job.check()
        return registry.held["ocr"].arms

    assert await tick() == (Arm("1", 95), Arm("2", 5))  # healthy, but not for a window yet
    clock.now += GUARD.window_s - 1
    assert await tick() == (Arm("1", 95), Arm("2", 5))
    clock.now += 1
    assert await tick() == (Arm("1", 75), Arm("2", 25))
    assert await tick() == (Arm("1", 75), Arm("2", 25))  # each step holds a whole window
    clock.now += GUARD.window_s
    assert await tick() == (Arm("1", 50), Arm("2", 50))
    clock.now += GUARD.window_s
    assert await tick() == (Arm("2", 100),)  # promoted
    assert registry.rollbacks == []
