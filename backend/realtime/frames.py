"""Live camera frames: a client sends binary frames (JPEG/WebP) as fast as it likes; results come
back per frame. One frame waits at a time: a newer one replaces it (the latest wins), so latency
stays bounded whatever the client sends, and frames are served at most `max_fps` times a second
per connection (the rate limit paces the work; the newest frame is always served in the end).
Transport-agnostic: the WebSocket endpoint hands in `receive` and `send`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Receive = Callable[[], Awaitable[bytes | None]]  # the next frame; None when the client left
Send = Callable[[dict[str, Any]], Awaitable[None]]
# one frame's bytes -> its results (decode, detect, classify; raises AppError on a bad frame)
Analyse = Callable[[bytes], Awaitable[dict[str, Any]]]


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
    def __init__(
        self,
        analyse: Analyse,
        *,
        max_fps: float,
        max_frame_bytes: int,
        frame_timeout_s: float,
    ) -> None:
        self._analyse = analyse
        self._interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self._max_bytes = max_frame_bytes
        self._timeout_s = frame_timeout_s
        self.stats = FrameStats()

    async def run(self, receive: Receive, send: Send) -> FrameStats:
        """Serves until the client leaves; the serving task never outlives the connection."""
        latest = _Latest()
        server = asyncio.create_task(self._serve(latest, send), name="live-frames")
        try:
            await self._receive(receive, send, latest)
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await server
        return self.stats

    async def _receive(self, receive: Receive, send: Send, latest: _Latest) -> None:
        while (data := await receive()) is not None:
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

    async def _serve(self, latest: _Latest, send: Send) -> None:
        next_start = 0.0
        while True:
            await latest.ready.wait()
            pause = next_start - time.monotonic()
            if pause > 0:  # the rate limit: newer frames may replace this one meanwhile
                await asyncio.sleep(pause)
            latest.ready.clear()
            if latest.frame is None:
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
                await send(
                    {
                        "type": "error",
                        "frame": index,
                        "code": getattr(exc, "code", "INFERENCE_FAILED"),
                        "message": getattr(exc, "message", None) or str(exc),
                    }
                )
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
