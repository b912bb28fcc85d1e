"""GCRA rate limits in Redis: exact across replicas, typed errors, remaining quota reported."""

from __future__ import annotations

import asyncio

import pytest
from httpx import ASGITransport, AsyncClient
from redis.asyncio import Redis

from backend.app import create_app
from backend.config import LimitsSettings, RateSpec, Settings
from backend.core.db import Database
from backend.core.redis import KeySpace
from backend.errors import RateLimited
from backend.limits.ratelimit import RateLimiter
from tests.conftest import lifespan


def _limits(rate: float, burst: int) -> LimitsSettings:
    spec = RateSpec(rate_per_s=rate, burst=burst)
    return LimitsSettings(rates={"free": {"query": spec, "mutation": spec, "subscription": spec}})


async def test_burst_then_refused_with_retry_after(redis: Redis, key_prefix: str) -> None:
    limiter = RateLimiter(redis, KeySpace(key_prefix), _limits(rate=1, burst=3))
    decisions = [await limiter.check("user:a", "free", "query") for _ in range(4)]
    assert [d.allowed for d in decisions if d] == [True, True, True, False]
    assert [d.remaining for d in decisions if d][:3] == [2, 1, 0]
    assert 0.9 <= decisions[3].retry_after_s <= 1.0  # type: ignore[union-attr]
    # Another subject and another class have their own allowance.
    assert (await limiter.check("user:b", "free", "query")).allowed  # type: ignore[union-attr]
    assert (await limiter.check("user:a", "free", "mutation")).allowed  # type: ignore[union-attr]
    with pytest.raises(RateLimited) as limited:
        await limiter.enforce("user:a", "free", "query")
    assert limited.value.code == "RATE_LIMITED"
    assert limited.value.extensions["retryAfter"] > 0


async def test_allowance_refills_at_the_rate(redis: Redis, key_prefix: str) -> None:
    limiter = RateLimiter(redis, KeySpace(key_prefix), _limits(rate=20, burst=1))
    assert (await limiter.check("s", "free", "query")).allowed  # type: ignore[union-attr]
    assert not (await limiter.check("s", "free", "query")).allowed  # type: ignore[union-attr]
    await asyncio.sleep(0.06)
    assert (await limiter.check("s", "free", "query")).allowed  # type: ignore[union-attr]


async def test_limit_holds_in_total_across_two_app_instances(
    settings: Settings, db: Database, redis: Redis
) -> None:
    """Two replicas against one Redis: the burst is shared, not doubled."""
    settings.limits = _limits(rate=0.01, burst=5)
    replicas = [create_app(settings, db=db, redis=redis) for _ in range(2)]
    async with lifespan(replicas[0]) as one, lifespan(replicas[1]) as two:
        clients = [
            AsyncClient(
                transport=ASGITransport(app=m.app, client=("10.9.8.7", 1)),
                base_url="http://sightline.test",
            )
            for m in (one, two)
        ]
        statuses = []
        for i in range(10):  # alternate replicas, same caller
            response = await clients[i % 2].post(
                "/graphql", json={"query": "{ serverInfo { version } }"}
            )
            body = response.json()
            statuses.append("ok" if body.get("data") else body["errors"][0]["extensions"]["code"])
        for client in clients:
            await client.aclose()
    assert statuses.count("ok") == 5
    assert statuses[5:] == ["RATE_LIMITED"] * 5


async def test_remaining_quota_is_in_response_extensions(client: AsyncClient) -> None:
    body = (await client.post("/graphql", json={"query": "{ serverInfo { version } }"})).json()
    rate = body["extensions"]["rateLimit"]
    assert rate["class"] == "query"
    assert rate["remaining"] == rate["limit"] - 1
