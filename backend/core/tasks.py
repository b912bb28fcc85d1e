"""Owned background work: periodic steps, and shutting down with a grace period, then
cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


async def drain(tasks: Iterable[asyncio.Task[None]], grace_s: float) -> None:
    """Lets `tasks` finish for `grace_s`, then cancels the rest and waits for them to end."""
    pending = list(tasks)
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=grace_s)
    for task in still:
        task.cancel("shutdown")
    await asyncio.gather(*still, return_exceptions=True)


class Periodic:
    """Runs `step` every `interval_s` (jittered, so replicas spread out) in a task its owner
    starts and closes; the first time after `first_after_s` when given. A step that fails or
    outlasts `timeout_s` is logged; the next one runs."""

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[object]],
        *,
        interval_s: float,
        timeout_s: float,
        jitter: float = 0.1,
        first_after_s: float | None = None,
    ) -> None:
        self.name = name
        self._first_after_s = first_after_s
        self._step = step
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._jitter = jitter
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        """Stops the loop; a step in progress is cancelled."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        if self._first_after_s is not None:
            await asyncio.sleep(self._first_after_s)
        first = self._first_after_s is not None
        while True:
            if not first:
                spread = random.uniform(1 - self._jitter, 1 + self._jitter)  # noqa: S311 (jitter)
                await asyncio.sleep(self._interval_s * spread)
            first = False
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._step()
            except Exception as exc:  # a failed step must not end the loop: the next one retries
                log.warning(
                    "%s failed: %s",
                    self.name,
                    exc or type(exc).__name__,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
