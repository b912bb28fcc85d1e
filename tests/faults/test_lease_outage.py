"""Leases through a Redis outage longer than a lease and its grace (Redis stopped, or paused so
that every command hangs): nobody renews meanwhile, and afterwards nobody takes a live owner for
dead (its renewals resume first)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from backend.core.leases import Leases
from tests.core.test_leases import GRACE_S, LEASE_S, Recorder
from tests.faults.servers import PrivateRedis

ROUNDS_DOWN = 12  # many failed renewals, longer than a lease and its grace
ROUND_S = LEASE_S / 3
PAUSE_S = 2 * (LEASE_S + GRACE_S)


@asynccontextmanager
async def owner_and_watcher(url: str) -> AsyncIterator[tuple[Leases, Leases]]:
    """A replica owning a lease and another one looking for lost leases, each with its own
    client; afterwards, neither has claimed anything and the owner still owns its lease."""
    owner_log, watcher_log = Recorder(), Recorder()
    clients = [Redis.from_url(url), Redis.from_url(url)]
    owner, watcher = (
        Leases(
            client,
            "leases",
            lease_s=LEASE_S,
            grace_s=GRACE_S,
            on_lost=log.on_lost,
            on_revoked=log.on_revoked,
            name=name,
        )
        for client, log, name in zip(
            clients, (owner_log, watcher_log), ("owner", "watcher"), strict=True
        )
    )
    try:
        await owner.acquire("t:run:u")
        yield owner, watcher
    finally:
        await owner.close()
        await watcher.close()
        for client in clients:
            await client.aclose()
    assert watcher_log.lost == []
    assert owner_log.lost == []
    assert owner_log.revoked == []
    assert owner.owns("t:run:u")


async def test_a_redis_restart_makes_no_live_lease_look_lost(private_redis: PrivateRedis) -> None:
    async with owner_and_watcher(private_redis.url) as (owner, watcher):

        async def rounds(count: int) -> None:
            for _ in range(count):
                await owner.tick()
                await watcher.tick()
                await asyncio.sleep(ROUND_S)

        await rounds(3)
        await asyncio.to_thread(private_redis.stop)
        await rounds(ROUNDS_DOWN)
        await asyncio.to_thread(private_redis.start)
        await rounds(int(3 * (LEASE_S + GRACE_S) / ROUND_S))


async def test_a_redis_pause_makes_no_live_lease_look_lost(private_redis: PrivateRedis) -> None:
    """Paused, Redis answers nothing and refuses nothing: every renewal hangs, then succeeds."""
    async with owner_and_watcher(private_redis.url) as (owner, watcher):
        owner.start()
        watcher.start()
        await asyncio.sleep(2 * (LEASE_S + GRACE_S))  # the watcher may claim by now
        private_redis.pause()
        try:
            await asyncio.sleep(PAUSE_S)
        finally:
            private_redis.resume()
        await asyncio.sleep(3 * (LEASE_S + GRACE_S))
