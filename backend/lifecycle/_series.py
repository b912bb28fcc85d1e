"""Counters per series and time bucket, shared by every replica through Redis hashes.

A request adds to a series in memory (no I/O, no await); a background task owned by the app
sends everything gathered since the last flush in one MULTI/EXEC round trip, so the figures of
all replicas add up in the same hashes. Each bucket's hash expires after the retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from urllib.parse import quote

from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.redis import KeySpace
from backend.core.tasks import Periodic

log = logging.getLogger(__name__)

Fields = dict[str, float]
Bucket = tuple[int, Fields]  # (start, epoch seconds; the fields added in it)


class Series:
    """Adds counters per (series, bucket) locally and flushes them to Redis periodically."""

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        settings: LifecycleSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._keys = keys.child("lifecycle")
        self._settings = settings
        self._clock = clock
        self._pending: dict[tuple[tuple[str, ...], int], defaultdict[str, float]] = {}
        self._dropped = 0
        # A read and a flush never interleave: a read whose HGETALLs reached Redis before a
        # flush's writes, and that looked at `_pending` after the flush had taken it, saw the
        # figures nowhere (a busy machine's timeline lost its last seconds now and then).
        self._consistent = asyncio.Lock()
        self._flushes = Periodic(
            "lifecycle stats flush",
            self.flush,
            interval_s=settings.stats_flush_interval_s,
            timeout_s=settings.stats_flush_timeout_s,
        )

    @property
    def bucket_s(self) -> int:
        return self._settings.stats_bucket_s

    @property
    def retention_s(self) -> int:
        return self._settings.stats_retention_s

    def add(self, series: tuple[str, ...], fields: Mapping[str, float]) -> None:
        """Adds `fields` to the current bucket of `series`: memory only, never waits."""
        bucket = int(self._clock() // self.bucket_s) * self.bucket_s
        slot = (series, bucket)
        counters = self._pending.get(slot)
        if counters is None:
            if len(self._pending) >= self._settings.stats_max_pending:
                self._dropped += 1
                return
            counters = self._pending[slot] = defaultdict(float)
        for name, value in fields.items():
            if value:
                counters[name] += value

    def _key(self, series: tuple[str, ...], bucket: int) -> str:
        # quoted: a ':' in a model name cannot make two series share a key
        return self._keys(*(quote(part, safe="") for part in series), str(bucket))

    async def flush(self) -> None:
        """Sends what was gathered since the last flush (one round trip); on failure it is lost."""
        async with self._consistent:
            await self._flush()

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warning("lifecycle stats: %d additions dropped (stats_max_pending)", dropped)
        if not pending:
            return
        ttl = self.retention_s + self.bucket_s
        # a failed flush loses these figures (Redis away): the serving path never waits for it
        async with self._redis.pipeline(transaction=True) as pipe:
            for (series, bucket), counters in pending.items():
                key = self._key(series, bucket)
                for name, value in counters.items():
                    # one command for every field: a float written to a field makes HINCRBY
                    # fail on it later (and MULTI/EXEC does not roll back the others)
                    pipe.hincrbyfloat(key, name, value)
                pipe.expire(key, ttl)
            async with asyncio.timeout(self._settings.stats_flush_timeout_s):
                await pipe.execute()

    async def read(self, series: tuple[str, ...], seconds: float) -> Fields:
        """The sums of `series` over the buckets that overlap the last `seconds` (at most the
        retention), on every replica, plus what this replica has not flushed yet."""
        total: Fields = defaultdict(float)
        for _, fields in await self.read_buckets(series, seconds):
            for name, value in fields.items():
                total[name] += value
        return dict(total)

    async def read_buckets(self, series: tuple[str, ...], seconds: float) -> list[Bucket]:
        """Each bucket that overlaps the last `seconds` (at most the retention), oldest first,
        as (its start in epoch seconds, its fields): every replica's figures plus what this
        replica has not flushed yet; a bucket with nothing has no fields."""
        now = self._clock()
        seconds = min(seconds, self.retention_s)
        last = int(now // self.bucket_s) * self.bucket_s
        first = int((now - seconds) // self.bucket_s) * self.bucket_s
        buckets = range(first, last + 1, self.bucket_s)
        async with self._consistent:
            async with self._redis.pipeline(transaction=False) as pipe:
                for bucket in buckets:
                    pipe.hgetall(self._key(series, bucket))
                stored = await pipe.execute()
            found: list[Bucket] = []
            for bucket, hashed in zip(buckets, stored, strict=True):
                fields: Fields = {name.decode(): float(value) for name, value in hashed.items()}
                for name, value in self._pending.get((series, bucket), {}).items():
                    fields[name] = fields.get(name, 0.0) + value
                found.append((bucket, fields))
        return found

    async def read_steps(
        self, series: tuple[str, ...], seconds: float, step_s: int
    ) -> list[Bucket]:
        """The buckets of the last `seconds` summed per step of `step_s` (a multiple of the
        bucket width), oldest first, every step present (an empty one has no fields)."""
        now = self._clock()
        first = int((now - min(seconds, self.retention_s)) // step_s) * step_s
        last = int(now // step_s) * step_s
        steps: dict[int, Fields] = {start: {} for start in range(first, last + 1, step_s)}
        for bucket, fields in await self.read_buckets(series, now - first):
            summed = steps.get(bucket // step_s * step_s)
            if summed is None:
                continue
            for name, value in fields.items():
                summed[name] = summed.get(name, 0.0) + value
        return list(steps.items())

    @property
    def running(self) -> bool:
        return self._flushes.running

    def start(self) -> None:
        self._flushes.start()

    async def close(self) -> None:
        """Stops the flushes, then sends what is left (bounded by the flush timeout)."""
        await self._flushes.close()
        with contextlib.suppress(Exception):
            await self.flush()
