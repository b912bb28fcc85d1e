"""Live camera frames: a client sends binary frames (JPEG/WebP) as fast as it likes; results come
back per frame. One frame waits at a time: a newer one replaces it (the latest wins), so latency
stays bounded whatever the client sends, and frames are served at most `max_fps` times a second
per connection (the rate limit paces the work; the newest frame is always served in the end).
When the client asks to stop, the frames it already sent are still answered before the
summary; when it leaves, the work is cancelled. Transport-agnostic: the WebSocket endpoint
hands in `receive` and `send`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from backend.errors import expected_error
from backend.inference.client import InferenceError

log = logging.getLogger(__name__)


class End(Enum):
    """Why a client sends no more frames."""

    STOP = "stop"  # it asked: answer the frames it sent, then the summary
    LEFT = "left"  # it is gone: nobody to answer, stop working


Receive = Callable[[], Awaitable[bytes | End]]  # the next frame, or why there is none
Send = Callable[[dict[str, Any]], Awaitable[None]]
# one frame's bytes -> its results (decode, detect, classify; raises AppError on a bad frame)
Analyse = Callable[[bytes], Awaitable[dict[str, Any]]]
# seconds to wait before the next frame is served (a cost budget); 0 to go on
Pace = Callable[[], float]


@dataclass
class FrameStats:
    received: int = 0
    served: int = 0
    dropped: int = 0  # replaced by a newer frame before it was served
    failed: int = 0


@dataclass
class _Latest:
    """A one-slot mailbox: putting replaces what has not been taken."""

    frame: tuple[int, float, bytes] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class LiveFrames:
    """One connection's frames: the latest waits, at most one is analysed at a time."""

    def __init__(
        self,
        analyse: Analyse,
        *,
        max_fps: float,
        max_frame_bytes: int,
        frame_timeout_s: float,
        pace: Pace | None = None,
    ) -> None:
        self._analyse = analyse
        self._interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self._max_bytes = max_frame_bytes
        self._timeout_s = frame_timeout_s
        self._pace = pace
        self.stats = FrameStats()

    async def run(self, receive: Receive, send: Send) -> FrameStats:
        """Serves until the client stops or leaves; the serving task never outlives the
        connection. After a stop, every frame received is counted as served, dropped or
        failed by the time this returns."""
        latest = _Latest()
        stopping = asyncio.Event()
        server = asyncio.create_task(self._serve(latest, send, stopping), name="live-frames")
        try:
            end = await self._receive(receive, send, latest)
            if end is End.STOP:
                stopping.set()
                latest.ready.set()  # wakes the server to finish what is there
                # the frame in analysis and the one waiting: each an analysis and a pause away
                grace = 2 * (self._timeout_s + self._interval) + self._waiting() + 1
                async with asyncio.timeout(grace):
                    await asyncio.shield(server)
        except TimeoutError:
            pass  # counted below, as failed
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await server
            stats = self.stats
            stats.failed = stats.received - stats.served - stats.dropped
        return self.stats

    async def _receive(self, receive: Receive, send: Send, latest: _Latest) -> End:
        while not isinstance(data := await receive(), End):
            self.stats.received += 1
            index = self.stats.received
            now = time.monotonic()
            if len(data) > self._max_bytes:
                self.stats.failed += 1
                await send(
                    {
                        "type": "error",
                        "frame": index,
                        "code": "PAYLOAD_TOO_LARGE",
                        "message": f"frame over {self._max_bytes} bytes",
                    }
                )
                continue
            if latest.frame is not None:
                self.stats.dropped += 1
            latest.frame = (index, now, data)
            latest.ready.set()
        return data

    async def _serve(self, latest: _Latest, send: Send, stopping: asyncio.Event) -> None:
        next_start = 0.0
        while True:
            if not stopping.is_set():
                await latest.ready.wait()
            # The rate limit and the cost budget (newer frames may replace this one meanwhile);
            # polled: the budget refills with time and is charged from decoding threads.
            while (pause := max(next_start - time.monotonic(), self._waiting())) > 0:  # noqa: ASYNC110
                await asyncio.sleep(pause)
            latest.ready.clear()
            if latest.frame is None:
                if stopping.is_set():
                    return  # every frame sent before the stop is answered
                continue
            next_start = time.monotonic() + self._interval
            index, arrived, data = latest.frame
            latest.frame = None
            try:
                async with asyncio.timeout(self._timeout_s):
                    result = await self._analyse(data)
            except TimeoutError:
                self.stats.failed += 1
                await send(
                    {"type": "error", "frame": index, "code": "TIMEOUT", "message": "too slow"}
                )
                continue
            except Exception as exc:  # a bad frame must not end the stream
                self.stats.failed += 1
                await send({"type": "error", "frame": index, **_frame_error(exc)})
                continue
            self.stats.served += 1
            await send(
                {
                    "type": "result",
                    "frame": index,
                    "latencyMs": round((time.monotonic() - arrived) * 1000, 1),
                    "dropped": self.stats.dropped,
                    **result,
                }
            )

    def _waiting(self) -> float:
        return self._pace() if self._pace is not None else 0.0


def _frame_error(exc: Exception) -> dict[str, Any]:
    """What a client hears of a frame that failed: an expected error's code and message; of
    anything else (a bug, an inference worker's failure) only that it failed, never its text
    (it can name internals). The exception goes to the log."""
    typed = expected_error(exc)
    if typed is not None:
        return {"code": typed.code, "message": typed.message, **typed.details}
    log.warning("live frame failed", exc_info=exc)
    code = exc.code if isinstance(exc, InferenceError) else InferenceError.code
    return {"code": code, "message": "the frame could not be analysed"}
