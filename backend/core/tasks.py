"""Owned background work: periodic steps, and shutting down with a grace period, then
cancellation."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], reason: str | None = None, *, again_after_s: float = 1.0
) -> None:
    """Cancels `tasks` and waits until every one has ended, cancelling again those still
    running after `again_after_s`.

    A cancellation can be lost inside a client library (redis-py on Python 3.11 was seen to
    swallow one mid-command), and a loop that catches the error it becomes runs on: a single
    cancel, then a wait, left a server's shutdown waiting until its lifespan's limit (60 s,
    then TimeoutError in CI). `again_after_s` leaves a task's own cleanup (a turn recording
    how it ended) time to finish before it is interrupted."""
    owned = list(tasks)
    pending = {task for task in owned if not task.done()}
    for task in pending:
        task.cancel(reason)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=again_after_s)
        for task in pending:
            log.warning("%s still runs after its cancellation; cancelling it again", task)
            task.cancel(reason)
    for task in owned:  # retrieved, so that none is reported as "never retrieved"
        if not task.cancelled():
            task.exception()


async def drain(
    tasks: Iterable[asyncio.Task[None]], grace_s: float, *, again_after_s: float = 10.0
) -> None:
    """Lets `tasks` finish for `grace_s`, then cancels the rest and waits for them to end
    (cancelling again those still running after `again_after_s`: a cancelled turn records how
    it ended before it stops, which may take seconds on a busy machine)."""
    pending = list(tasks)
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=grace_s)
    await cancel_and_wait(still, "shutdown", again_after_s=again_after_s)


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
        self._stopped = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._stopped = False
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        """Stops the loop; a step in progress is cancelled.

        A cancellation can be lost inside a client library (redis-py on Python 3.11 was seen
        to swallow one mid-command), so the loop also stops on a flag, and is cancelled
        again until it has ended."""
        task, self._task = self._task, None
        self._stopped = True
        if task is not None:
            await cancel_and_wait([task], again_after_s=0.1)
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with %r", self.name, task.exception())

    async def _run(self) -> None:
        delay = self._first_after_s
        while not self._stopped:
            if delay is None:
                delay = self._interval_s * random.uniform(1 - self._jitter, 1 + self._jitter)  # noqa: S311 (jitter)
            await asyncio.sleep(delay)
            delay = None
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
