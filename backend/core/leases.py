"""Leases in Redis on work that one replica owns (a chat run, an ingestion job).

The owner renews its leases while it lives; once one stops being renewed, another replica (or
the owner, restarted) claims it and recovers the work: fails it, or resumes it.

Timing. An owner renews every `lease_s / 3`, each time to now + `lease_s`. A lease is lost
when its deadline is more than `grace_s` in the past, and a replica claims lost leases only
once it has itself reached Redis without an error for `grace_s`: after a Redis outage, which
cuts every replica off alike, each owner gets that long to renew before anyone may claim, so
an outage never makes live work look lost. Keep `grace_s` above `lease_s / 3` plus the Redis
socket timeout (the longest a renewal can take), and above the clock skew between replicas.

A claim hands the lease over instead of deleting it: the claimer's deadline replaces the old
one and the claimer renews it while it recovers, so if the claimer dies too, the lease expires
again and a third replica recovers the work. Recovery must therefore be idempotent. An owner
tells a claim from its own renewal by the deadline: it renews only a lease that still holds a
deadline it wrote; one that holds another was claimed (the owner was taken for dead and must
stop). A lease that is gone altogether (Redis lost its data) is written again by its owner.

Work whose lease is gone with its owner (Redis lost its data, or it predates leases) is found
by `find_unleased` (the service's own query, run every `scan_every_s`): each is given an expired
lease, which the next round claims like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from backend.config import JobRecoverySettings
from backend.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# KEYS: the lease set. ARGV: the new deadline, then for each member: the member, how many
# deadlines the caller may have written last (more than one after a renewal whose reply was
# lost), those deadlines. Renews the leases that hold one of them; writes again those that are
# gone; returns {claimed by another replica, written again}.
_RENEW = """
local claimed, restored = {}, {}
local i = 2
while i <= #ARGV do
  local member, count = ARGV[i], tonumber(ARGV[i + 1])
  local score = redis.call('ZSCORE', KEYS[1], member)
  local mine = false
  if score then
    for j = 1, count do
      if tonumber(score) == tonumber(ARGV[i + 1 + j]) then mine = true end
    end
  end
  if not score then
    redis.call('ZADD', KEYS[1], ARGV[1], member)
    table.insert(restored, member)
  elseif mine then
    redis.call('ZADD', KEYS[1], ARGV[1], member)
  else
    table.insert(claimed, member)
  end
  i = i + 2 + count
end
return {claimed, restored}
"""

# ARGV: member, cutoff, new deadline. Hands the lease to the caller when it is still lost.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Work:
    """What a lease is on: the tenant, the work's id, its user; its member in the lease set
    is all that recovery starts from (written "tenant:id:user")."""

    tenant_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID | None = None

    @property
    def member(self) -> str:
        return f"{self.tenant_id}:{self.id}:{self.user_id or ''}"

    @classmethod
    def of(cls, member: str) -> Work:
        tenant, ident, user = member.split(":")
        return cls(uuid.UUID(tenant), uuid.UUID(ident), uuid.UUID(user) if user else None)


def cancel_when_revoked(
    tasks: Mapping[uuid.UUID, asyncio.Task[Any]], reason: str
) -> Callable[[str], None]:
    """An `on_revoked` handler: another replica took this one for dead and took the work over
    (failed it, or started it again), so the task working on it here (in `tasks`, by the work's
    id) is cancelled with `reason`."""

    def revoked(member: str) -> None:
        with contextlib.suppress(ValueError):
            task = tasks.get(Work.of(member).id)
            if task is not None and not task.done():
                task.cancel(reason)

    return revoked


def job_leases(
    redis: Redis,
    key: str,
    settings: JobRecoverySettings,
    *,
    tasks: Mapping[uuid.UUID, asyncio.Task[Any]],
    on_lost: LostHandler,
    find_unleased: Callable[[], Awaitable[list[str]]],
    name: str,
) -> Leases:
    """The leases of a kind of background job (ingestion, vision): timed by its settings, a
    job taken over elsewhere is cancelled here, and work with no lease is looked for now and
    then (Redis lost it)."""
    return Leases(
        redis,
        key,
        lease_s=settings.job_lease_s,
        grace_s=settings.job_lost_grace_s,
        on_lost=on_lost,
        on_revoked=cancel_when_revoked(tasks, "the job was taken over"),
        recover_timeout_s=3 * settings.outage_retry_s + 60,
        find_unleased=find_unleased,
        scan_every_s=20 * settings.job_lease_s,
        name=name,
    )


MAX_UNCERTAIN = 64  # deadlines remembered per lease while renewals fail (see _RENEW)

# Called with a claimed member: True when the work is recovered (the lease is released), False
# when the handler adopted the work (it releases the lease when the work ends). An exception
# leaves the lease to expire again: recovery is tried again later, here or elsewhere.
LostHandler = Callable[[str], Awaitable[bool]]


class Leases:
    """The leases of one kind of work (one sorted set: member -> deadline, unix time)."""

    def __init__(
        self,
        redis: Redis,
        key: str,
        *,
        lease_s: float,
        grace_s: float,
        on_lost: LostHandler,
        on_revoked: Callable[[str], None] | None = None,
        recover_timeout_s: float = 120.0,
        claim_batch: int = 100,
        find_unleased: Callable[[], Awaitable[list[str]]] | None = None,
        scan_every_s: float = 300.0,
        name: str = "leases",
    ) -> None:
        self._redis = redis
        self.key = key
        self.lease_s = lease_s
        self.grace_s = grace_s
        self._on_lost = on_lost
        self._on_revoked = on_revoked
        self._recover_timeout_s = recover_timeout_s
        self._claim_batch = claim_batch
        self._name = name
        self._renew = redis.register_script(_RENEW)
        self._claim = redis.register_script(_CLAIM)
        self._find_unleased = find_unleased
        self._scan_every_s = scan_every_s
        self._next_scan = 0.0
        # member -> the deadlines this replica may have written last (the last renewal's reply
        # can be lost: then any of them may be in Redis)
        self._owned: dict[str, tuple[float, ...]] = {}
        self._recovering: dict[str, asyncio.Task[None]] = {}
        self._healthy_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._claiming = True

    # -- lifecycle (owned by the service that owns the work) -----------------------------------

    def start(self, *, claim: bool = True) -> None:
        """Starts the upkeep: renewing this replica's leases and (with `claim`) claiming lost
        ones. A one-off process (a CLI command) renews its own and claims none."""
        self._claiming = claim
        self._task = asyncio.create_task(self._keep(), name=f"{self._name}-keeper")

    async def close(self, grace_s: float = 5.0) -> None:
        """Stops renewing (what is still owned then expires and is recovered elsewhere)."""
        if self._task is not None:
            await cancel_and_wait([self._task])
        recovering = list(self._recovering.values())
        if recovering:
            _, pending = await asyncio.wait(recovering, timeout=grace_s)
            await cancel_and_wait(pending)

    # -- the owner's side ----------------------------------------------------------------------

    def deadline(self) -> float:
        return time.time() + self.lease_s

    async def acquire(self, member: str) -> None:
        deadline = self.deadline()
        await self._redis.zadd(self.key, {member: deadline})
        self._owned[member] = (deadline,)  # only once it is in Redis

    def acquire_in(self, pipe: Pipeline, member: str) -> Callable[[], None]:
        """`acquire` queued on a pipeline (put it first: whatever the commands after it did,
        should the replica die, is then this lease's to recover). Call what it returns once
        the pipeline has answered: the lease is renewed from then on."""
        deadline = self.deadline()
        pipe.zadd(self.key, {member: deadline})
        return lambda: self._owned.__setitem__(member, (deadline,))

    async def release(self, member: str) -> None:
        """The work ended: the lease goes (renewals stop first)."""
        self._owned.pop(member, None)
        await self._redis.zrem(self.key, member)

    def release_in(self, pipe: Pipeline, member: str) -> None:
        """`release` queued on a pipeline (renewals stop at once; should the pipeline fail,
        the lease expires unrenewed and is recovered)."""
        self._owned.pop(member, None)
        pipe.zrem(self.key, member)

    def abandon(self, member: str) -> None:
        """Stops renewing without releasing: the lease expires and the work is recovered
        (here or on another replica). For work whose end could not be recorded."""
        self._owned.pop(member, None)

    def owns(self, member: str) -> bool:
        return member in self._owned

    # -- anyone's side -------------------------------------------------------------------------

    async def live(self, members: Sequence[str]) -> list[bool]:
        """Whether each member has a lease that is not lost (renewed, or late by less than
        the grace)."""
        if not members:
            return []
        scores = await self._redis.zmscore(self.key, list(members))
        cutoff = time.time() - self.grace_s
        return [score is not None and score >= cutoff for score in scores]

    # -- upkeep --------------------------------------------------------------------------------

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self.tick()

    async def tick(self) -> None:
        """One round of upkeep: renew what this replica owns, then claim lost leases (only
        after `grace_s` of reaching Redis without error). Never raises."""
        started = time.monotonic()
        try:
            await self._renew_owned()
        except Exception as exc:  # Redis down or slow: owners elsewhere cannot renew either
            if self._healthy_since is not None:
                log.warning(
                    "%s: cannot renew leases (%r); not claiming any until Redis "
                    "has answered for %.0f s",
                    self._name,
                    exc,
                    self.grace_s,
                )
            self._healthy_since = None
            return
        now = time.monotonic()
        if self._healthy_since is None or now - started > self.lease_s / 3:
            # a renewal that waited that long (Redis paused, this loop starved) held up the
            # other owners' renewals as much: they get the grace again from here
            self._healthy_since = now
        if not self._claiming or now - self._healthy_since < self.grace_s:
            return
        try:
            if self._find_unleased is not None and now >= self._next_scan:
                self._next_scan = now + self._scan_every_s
                await self._lease_the_unleased(self._find_unleased)
            await self._claim_lost()
        except Exception as exc:
            log.warning("%s: cannot look for lost leases: %r", self._name, exc)
            self._healthy_since = None

    async def _renew_owned(self) -> None:
        owned = dict(self._owned)
        if not owned:
            await self._redis.ping()  # health counts for claiming, with or without leases
            return
        deadline = self.deadline()
        args: list[str | float] = [deadline]
        for member, written in owned.items():
            args += [member, len(written), *written]
        try:
            claimed, restored = await self._renew(keys=[self.key], args=args)
        except BaseException:
            for member, written in owned.items():  # the renewal may have been applied
                if member in self._owned:
                    self._owned[member] = _uncertain(written, deadline)
            raise
        self._renewed(owned, deadline, {_text(raw) for raw in claimed or ()}, restored)

    def _renewed(
        self,
        owned: dict[str, tuple[float, ...]],
        deadline: float,
        claimed: set[str],
        restored: list[bytes | str] | None,
    ) -> None:
        for member in owned:
            if member in self._owned and member not in claimed:
                self._owned[member] = (deadline,)
        for member in claimed:
            if self._owned.pop(member, None) is not None:
                log.warning("%s: %s was claimed by another replica", self._name, member)
                if self._on_revoked is not None:
                    self._on_revoked(member)
        for member in map(_text, restored or ()):
            # (one released or abandoned while this renewal was on its way is back too: it is
            # claimed once it expires, and recovery finds its work ended: idempotent)
            log.warning(
                "%s: lease on %s was gone (Redis lost data?); written again", self._name, member
            )

    async def _lease_the_unleased(self, find: Callable[[], Awaitable[list[str]]]) -> None:
        """Gives work with no lease at all an expired one, so that it is claimed."""
        members = await find()
        if not members:
            return
        scores = await self._redis.zmscore(self.key, members)
        unleased = [m for m, score in zip(members, scores, strict=True) if score is None]
        if unleased:
            added = await self._redis.zadd(self.key, dict.fromkeys(unleased, 0), nx=True)
            log.warning("%s: %d unfinished with no lease; recovering them", self._name, added)

    async def _claim_lost(self) -> None:
        cutoff = time.time() - self.grace_s
        lost = await self._redis.zrangebyscore(
            self.key, "-inf", f"({cutoff}", start=0, num=self._claim_batch
        )
        for raw in lost:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            if member in self._owned or member in self._recovering:
                continue
            deadline = self.deadline()
            if not await self._claim(keys=[self.key], args=[member, cutoff, deadline]):
                continue  # renewed meanwhile, or another replica was first
            self._owned[member] = (deadline,)
            self._recovering[member] = asyncio.create_task(
                self._recover(member), name=f"{self._name}-recover"
            )

    async def _recover(self, member: str) -> None:
        try:
            async with asyncio.timeout(self._recover_timeout_s):
                done = await self._on_lost(member)
        except asyncio.CancelledError:
            self._owned.pop(member, None)
            raise
        except Exception:
            log.exception(
                "%s: could not recover %s; retried once its lease expires again", self._name, member
            )
            self._owned.pop(member, None)
            return
        finally:
            self._recovering.pop(member, None)
        if done:
            try:
                await self.release(member)
            except Exception as exc:  # it expires and is recovered again: recovery is idempotent
                log.warning("%s: could not release %s: %r", self._name, member, exc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _uncertain(written: tuple[float, ...], attempted: float) -> tuple[float, ...]:
    """The deadlines a lease may hold after a renewal that failed: the last one confirmed
    (first), and those attempted since (the earliest and the latest, when too many)."""
    confirmed, attempts = written[0], [*written[1:], attempted]
    if len(attempts) > MAX_UNCERTAIN:
        half = MAX_UNCERTAIN // 2
        attempts = attempts[:half] + attempts[-half:]
    return (confirmed, *attempts)
