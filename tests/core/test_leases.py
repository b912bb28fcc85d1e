"""Leases in Redis: renewed while their owner lives, claimed (and handed over) once it stops,
never claimed by a replica that has not reached Redis for the grace period itself."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from backend.core.leases import Leases

LEASE_S = 1.0
GRACE_S = 1.0
PATIENCE_S = 30.0  # how long a test waits for what should happen within a few seconds


class Recorder:
    """An `on_lost` handler that records its calls and answers as told."""

    def __init__(self, outcome: bool | Exception = True) -> None:
        self.outcome = outcome
        self.lost: list[str] = []
        self.revoked: list[str] = []

    async def on_lost(self, member: str) -> bool:
        self.lost.append(member)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def on_revoked(self, member: str) -> None:
        self.revoked.append(member)


def leases(redis: Redis, key_prefix: str, recorder: Recorder, name: str) -> Leases:
    return Leases(
        redis,
        key_prefix + "leases",
        lease_s=LEASE_S,
        grace_s=GRACE_S,
        on_lost=recorder.on_lost,
        on_revoked=recorder.on_revoked,
        name=name,
    )


async def eventually(check, what: str) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(PATIENCE_S):
        while not check():
            await asyncio.sleep(0.05)


async def test_a_renewed_lease_is_never_claimed_and_a_dead_owners_is_claimed_once(
    redis: Redis, key_prefix: str
) -> None:
    owner_log, watcher_log, other_log = Recorder(), Recorder(), Recorder()
    owner = leases(redis, key_prefix, owner_log, "owner")
    watchers = [
        leases(redis, key_prefix, watcher_log, "watcher"),
        leases(redis, key_prefix, other_log, "other"),
    ]
    owner.start()
    for watcher in watchers:
        watcher.start()
    try:
        await owner.acquire("t:alive:u")
        await owner.acquire("t:dies:u")
        owner.abandon("t:dies:u")  # its owner stops renewing it, as a killed replica would
        # any of the three may claim it (the owner too: a restarted replica recovers its own)
        await eventually(lambda: owner_log.lost or watcher_log.lost or other_log.lost, "a claim")
        await asyncio.sleep(3 * (LEASE_S + GRACE_S))  # more rounds: nothing more is claimed
        assert sorted(owner_log.lost + watcher_log.lost + other_log.lost) == ["t:dies:u"]
        assert owner.owns("t:alive:u")
        assert owner_log.revoked == []
        assert await redis.zscore(key_prefix + "leases", "t:dies:u") is None  # released
    finally:
        await owner.close()
        for watcher in watchers:
            await watcher.close()


async def test_a_claimer_that_dies_while_recovering_hands_the_work_on(
    redis: Redis, key_prefix: str
) -> None:
    """The claim hands the lease over: when the claimer dies too, a third replica recovers."""
    failing, healthy = Recorder(outcome=RuntimeError("the claimer died")), Recorder()
    dead = leases(redis, key_prefix, Recorder(), "dead")
    await dead.acquire("t:work:u")  # never renewed: no upkeep runs for it
    claimer = leases(redis, key_prefix, failing, "claimer")
    claimer.start()
    try:
        await eventually(lambda: failing.lost, "the first claim")
    finally:
        await claimer.close()
    assert await redis.zscore(key_prefix + "leases", "t:work:u") is not None  # not deleted
    third = leases(redis, key_prefix, healthy, "third")
    third.start()
    try:
        await eventually(lambda: healthy.lost, "the second claim")
    finally:
        await third.close()
    assert healthy.lost == ["t:work:u"]


async def test_an_owner_taken_for_dead_hears_that_its_lease_was_claimed(
    redis: Redis, key_prefix: str
) -> None:
    mine = Recorder()
    owner = leases(redis, key_prefix, mine, "owner")
    await owner.acquire("t:run:u")
    await owner.tick()  # its own renewal is no claim
    assert mine.revoked == []
    # another replica claimed it (its own deadline replaced the owner's)
    await redis.zadd(key_prefix + "leases", {"t:run:u": time.time() + 5})
    await owner.tick()
    assert mine.revoked == ["t:run:u"]
    assert not owner.owns("t:run:u")


async def test_a_lease_redis_lost_is_written_again_by_its_owner(
    redis: Redis, key_prefix: str
) -> None:
    mine = Recorder()
    owner = leases(redis, key_prefix, mine, "owner")
    await owner.acquire("t:run:u")
    await redis.delete(key_prefix + "leases")  # Redis restarted without its data
    await owner.tick()
    assert mine.revoked == []
    assert owner.owns("t:run:u")
    assert await redis.zscore(key_prefix + "leases", "t:run:u") is not None


async def test_work_with_no_lease_at_all_is_found_and_recovered(
    redis: Redis, key_prefix: str
) -> None:
    """Work whose owner died with Redis's data (or that predates leases) has no lease: the
    service's own query finds it, and it is recovered like any other."""
    recorder = Recorder()
    unfinished = ["t:forgotten:u", "t:leased:u"]

    async def find_unleased() -> list[str]:
        return unfinished

    table = Leases(
        redis,
        key_prefix + "leases",
        lease_s=LEASE_S,
        grace_s=GRACE_S,
        on_lost=recorder.on_lost,
        find_unleased=find_unleased,
        name="scan",
    )
    live = leases(redis, key_prefix, Recorder(), "live")
    await live.acquire("t:leased:u")
    live.start()
    table.start()
    try:
        await eventually(lambda: recorder.lost, "the recovery")
        await asyncio.sleep(2 * (LEASE_S + GRACE_S))
    finally:
        await table.close()
        await live.close()
    assert recorder.lost == ["t:forgotten:u"]


async def test_liveness_counts_a_late_lease_within_the_grace(redis: Redis, key_prefix: str) -> None:
    table = leases(redis, key_prefix, Recorder(), "t")
    now = time.time()
    await redis.zadd(
        key_prefix + "leases",
        {"renewed": now + LEASE_S, "late": now - GRACE_S / 2, "lost": now - 3 * GRACE_S},
    )
    assert await table.live(["renewed", "late", "lost", "never"]) == [True, True, False, False]
