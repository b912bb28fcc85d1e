"""uvicorn's server, woken once a second instead of ten times a second when idle.

uvicorn's main loop sleeps 0.1 s between ticks to notice a shutdown request and refreshes the
Date header on every tenth. Those ten timer wakeups a second were half of an idle replica's
(measured with strace on `serve`: about 20 a second, 0.5% of a core against LiteLLM's 0.2%).
Here the loop waits for the exit request itself, with the Date header's second as its limit,
so a signal still stops the server at once.

Only `serve` with one worker runs it: uvicorn's multi-worker supervisor builds its own
servers in the worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from types import FrameType
from typing import Any

import uvicorn

STARTUP_FAILURE = 3  # uvicorn's exit status when the app did not start
TICK_S = 1.0  # the Date header's resolution; uvicorn refreshes it every tenth 0.1 s tick


class QuietServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit_requested: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.wake()

    def wake(self) -> None:
        """Makes the main loop look at `should_exit` now (from a signal handler or a thread)."""
        if self._loop is not None and self._exit_requested is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to wake
                self._loop.call_soon_threadsafe(self._exit_requested.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit_requested = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # every call refreshes the Date header
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._exit_requested.wait()
            should_exit = await self.on_tick(counter)


def run(app: Any, **options: Any) -> None:
    """`uvicorn.run(app, **options)` for an app object, with QuietServer."""
    config = uvicorn.Config(app, **options)
    server = QuietServer(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
