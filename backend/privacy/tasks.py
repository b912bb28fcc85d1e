"""The periodic purge: one pass per `purge_interval_s` across all replicas, owned by the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from redis.asyncio import Redis

from backend.config import PrivacySettings
from backend.core.redis import KeySpace
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
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._settings.purge_enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="privacy-purge")

    async def close(self) -> None:
        """Stops the loop; a pass in progress is cancelled (its batch rolls back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_if_due(self) -> bool:
        """Runs a pass when none ran within the interval; True when this call ran one."""
        interval = max(1, round(self._settings.purge_interval_s))
        if not await self._redis.set(self._due, 1, nx=True, ex=interval):
            return False
        removed = await self._service.purge()
        if removed.as_dict():
            log.info("purge pass removed %s", removed.as_dict())
        return True

    async def _run(self) -> None:
        await asyncio.sleep(self._settings.purge_start_delay_s)
        check_s = min(self._settings.purge_interval_s, 60.0)
        while True:
            try:
                await self.run_if_due()
            except Exception:  # a failed pass must not end the loop: the next one retries
                log.exception("purge pass failed")
            await asyncio.sleep(check_s * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)
