"""The serving path's two hooks, as the integrator wires them: `stats.record` counts the
version that served, `mirror` runs a sampled request on the shadow after the answer."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.metrics import Metrics
from backend.core.redis import KeySpace
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.policy import Route, RouteReason
from backend.lifecycle.shadow import compare_vision
from tests.conftest import scaled

LIVE = Route("clf", "1", RouteReason.POLICY)
SAMPLED = Route("clf", "1", RouteReason.POLICY, shadow="2")


async def test_served_and_mirrored_requests_are_counted_after_close(
    redis: Redis, key_prefix: str
) -> None:
    ops = ModelOperations(redis, KeySpace(key_prefix), LifecycleSettings(), Metrics())
    ops.start()
    result = {"classes": [{"label": "cat", "score": 0.9}]}
    shadow_runs: list[str] = []

    async def shadow() -> dict[str, Any]:
        shadow_runs.append("2")
        return {"classes": [{"label": "cat", "score": 0.8}]}

    def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        return compare_vision("classify", a, b)

    for route in (LIVE, SAMPLED):
        ops.stats.record(
            route.model, route.version, ok=True, latency_s=0.02, compute_s=0.02, cost=0.001
        )
        ops.mirror(route, result, 0.02, shadow, compare)
    ops.stats.record("clf", "1", ok=False, latency_s=0.5)
    async with asyncio.timeout(scaled(10)):
        while ops.shadows.in_flight or not shadow_runs:
            await asyncio.sleep(0.01)
    await ops.close()  # sends the last figures

    again = ModelOperations(redis, KeySpace(key_prefix), LifecycleSettings(), Metrics())
    served = await again.stats.window("clf", "1", 60)
    assert (served.requests, served.errors, served.cost) == (3, 1, 0.002)
    agreement = await again.agreements.window("clf", "1", "2", 60)
    assert shadow_runs == ["2"]  # only the sampled request was mirrored
    assert (agreement.compared, agreement.metrics) == (1, {"top1_agreement": 1.0})
    # the shadow's own runs, for modelComparison's shadow row
    assert (await again.stats.window("clf", "2", 60)).requests == 1
