"""Leases through a Redis outage longer than a lease and its grace: nobody renews meanwhile,
and afterwards nobody takes a live owner for dead (its renewals resume first)."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from backend.core.leases import Leases
from tests.core.test_leases import GRACE_S, LEASE_S, Recorder
from tests.faults.servers import PrivateRedis

ROUNDS_DOWN = 12  # many failed renewals, longer than a lease and its grace
ROUND_S = LEASE_S / 3


async def test_an_outage_makes_no_live_lease_look_lost(private_redis: PrivateRedis) -> None:
    owner_log, watcher_log = Recorder(), Recorder()
    clients = [Redis.from_url(private_redis.url), Redis.from_url(private_redis.url)]
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

    async def rounds(count: int) -> None:
        for _ in range(count):
            await owner.tick()
            await watcher.tick()
            await asyncio.sleep(ROUND_S)

    try:
        await owner.acquire("t:run:u")
        await rounds(3)
        await asyncio.to_thread(private_redis.stop)
        await rounds(ROUNDS_DOWN)  # longer than a lease and its grace
        await asyncio.to_thread(private_redis.start)
        await rounds(int(3 * (LEASE_S + GRACE_S) / ROUND_S))
    finally:
        for client in clients:
            await client.aclose()
    assert watcher_log.lost == []
    assert owner_log.lost == []
    assert owner_log.revoked == []
    assert owner.owns("t:run:u")
