"""The periodic purge: one pass per `purge_interval_s` across all replicas, owned by the app."""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from backend.config import PrivacySettings
from backend.core.redis import KeySpace
from backend.core.tasks import Periodic
from backend.privacy.service import PrivacyService

log = logging.getLogger(__name__)


class PurgeScheduler:
    """Starts a purge pass when one is due. The replica that sets the pass's key in Redis (SET
    NX with the interval as its lifetime) runs it; the others find it set and wait, so a pass
    runs once per interval however many replicas there are, and restarts do not reset the
    clock. The pass itself is bounded (`purge_timeout_s`) and skips rows another transaction
    holds, so even two passes at once would only share the work."""

    def __init__(
        self, service: PrivacyService, redis: Redis, keys: KeySpace, settings: PrivacySettings
    ) -> None:
        self._service = service
        self._redis = redis
        self._due = keys("privacy", "purge-due")
        self._settings = settings
        self._passes = Periodic(
            "privacy purge pass",
            self.run_if_due,
            interval_s=min(settings.purge_interval_s, 60.0),
            # the pass stops itself at purge_timeout_s; this only ends a hang outside it
            timeout_s=settings.purge_timeout_s + 60,
            jitter=0.2,
            first_after_s=settings.purge_start_delay_s,
        )

    def start(self) -> None:
        if self._settings.purge_enabled:
            self._passes.start()

    @property
    def running(self) -> bool:
        return self._passes.running

    async def close(self) -> None:
        """Stops the loop; a pass in progress is cancelled (its batch rolls back)."""
        await self._passes.close()

    async def run_if_due(self) -> bool:
        """Runs a pass when none ran within the interval; True when this call ran one."""
        interval = max(1, round(self._settings.purge_interval_s))
        if not await self._redis.set(self._due, 1, nx=True, ex=interval):
            return False
        removed = await self._service.purge()
        if removed.as_dict():
            log.info("purge pass removed %s", removed.as_dict())
        return True
