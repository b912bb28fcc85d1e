"""Which replicas are alive, and which of them have loaded a version: kept in Redis (a
heartbeat per replica, a report per replica and version, each with a TTL), read by the registry
service to move a LOADING version to READY or FAILED."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.redis import KeySpace
from backend.lifecycle.policy import VersionStatus

MAX_ERROR_CHARS = 500


class Replicas:
    def __init__(self, redis: Redis, keys: KeySpace, settings: LifecycleSettings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings

    async def heartbeat(self, replica_id: str) -> None:
        """Says the replica is alive for `replica_ttl_s` (loading versions wait for it)."""
        now = await self._now()
        key = self._keys("replicas")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {replica_id: now + self._settings.replica_ttl_s})
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.expire(key, max(1, math.ceil(self._settings.replica_ttl_s * 2)))
            await pipe.execute()

    async def leave(self, replica_id: str) -> None:
        """The replica stops (loading versions no longer wait for it)."""
        await self._redis.zrem(self._keys("replicas"), replica_id)

    async def live(self) -> list[str]:
        now = await self._now()
        members = await self._redis.zrangebyscore(self._keys("replicas"), now, "+inf")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def record(
        self, replica_id: str, model: str, version: str, ok: bool, error: str | None
    ) -> None:
        """The replica loaded and warmed `model@version` (ok), or could not (error)."""
        key = self._keys("ready", model, version)
        body = json.dumps({"ok": ok, "error": (error or "")[:MAX_ERROR_CHARS] or None})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, replica_id, body)
            pipe.expire(key, self._settings.readiness_ttl_s)
            await pipe.execute()

    async def outcome(self, model: str, version: str) -> tuple[VersionStatus | None, str | None]:
        """READY when every live replica reported the version ok, FAILED (with why) when one
        failed; (None, None) while some have not said."""
        reports = await self._redis.hgetall(self._keys("ready", model, version))
        return settled(await self.live(), reports)

    async def _now(self) -> float:
        seconds, micros = await self._redis.time()  # one clock for every replica
        return float(seconds) + micros / 1e6


def settled(
    live: Sequence[str], reports: Mapping[bytes, bytes]
) -> tuple[VersionStatus | None, str | None]:
    """What the reports of `live` replicas say (reports of replicas gone do not count)."""
    said: dict[str, dict[str, Any]] = {}
    for replica, body in reports.items():
        try:
            said[replica.decode()] = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            continue
    for replica in live:
        report = said.get(replica)
        if report is not None and not report.get("ok"):
            return VersionStatus.FAILED, f"replica {replica}: {report.get('error') or 'failed'}"
    if live and all(said.get(r, {}).get("ok") for r in live):
        return VersionStatus.READY, None
    return None, None
