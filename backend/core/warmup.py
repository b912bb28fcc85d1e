"""Models loaded and run once at startup, in the background: what is still warming, what is
ready, and what failed and why. The app starts the steps; `/readyz` reads their states."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from backend.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Warmth(StrEnum):
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"


@dataclass
class WarmState:
    status: Warmth = Warmth.WARMING
    error: str | None = None  # why it failed (may name files: not for anonymous callers)
    seconds: float | None = None  # how long its load and first run took


class WarmUp:
    """Owns one task per warm-up step; each ends within `timeout_s`, and `close` cancels those
    still running (a step in a thread is abandoned, not interrupted)."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._states: dict[str, WarmState] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, step: Callable[[], Awaitable[object]]) -> None:
        """Runs `step` in the background; `name` is the model as operators know it."""
        self._states[name] = WarmState()
        self._tasks.append(asyncio.create_task(self._run(name, step), name=f"warm-up {name}"))

    async def _run(self, name: str, step: Callable[[], Awaitable[object]]) -> None:
        state = self._states[name]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                await step()
        except TimeoutError:
            state.status, state.error = Warmth.FAILED, f"not warm after {self._timeout_s:g} s"
        except Exception as exc:  # a model that cannot load fails alone; the others serve
            state.status, state.error = Warmth.FAILED, f"{type(exc).__name__}: {exc}"
        else:
            state.status, state.seconds = Warmth.READY, time.perf_counter() - started
            log.info("warm-up: %s ready in %.2f s", name, state.seconds)
            return
        log.error("warm-up: %s failed: %s", name, state.error)

    def states(self) -> dict[str, WarmState]:
        return dict(self._states)

    async def wait(self) -> None:
        """Until every step has ended (ready or failed)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        await cancel_and_wait(self._tasks, "shutdown")
