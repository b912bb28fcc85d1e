"""Live frames on their own: the latest wins, the rate limit, oversized and bad frames."""

from __future__ import annotations

import asyncio
from typing import Any

from backend.errors import ValidationFailed
from backend.realtime.frames import LiveFrames


class Camera:
    """Sends `frames` as fast as the session takes them, then leaves."""

    def __init__(self, frames: list[bytes], gap_s: float = 0.0, linger_s: float = 0.3) -> None:
        self.frames = list(frames)
        self.gap_s = gap_s
        self.linger_s = linger_s
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> bytes | None:
        await asyncio.sleep(self.gap_s)
        if not self.frames:
            await asyncio.sleep(self.linger_s)  # stay a moment for the last result
            return None
        return self.frames.pop(0)

    async def send(self, body: dict[str, Any]) -> None:
        self.sent.append(body)


async def slow_analysis(frame: bytes) -> dict[str, Any]:
    if frame == b"bad":
        raise ValidationFailed("not an image")
    await asyncio.sleep(0.05)
    return {"echo": frame.decode()}


async def test_the_latest_frame_wins_when_frames_come_too_fast() -> None:
    camera = Camera([f"f{i}".encode() for i in range(40)], gap_s=0.002)
    session = LiveFrames(slow_analysis, max_fps=1000, max_frame_bytes=100, frame_timeout_s=1)
    stats = await session.run(camera.receive, camera.send)
    served = [m["frame"] for m in camera.sent if m["type"] == "result"]
    assert stats.received == 40
    assert stats.dropped > 20  # most frames were replaced before they were served
    assert served == sorted(served)
    assert served[-1] == 40  # the newest frame is always served
    assert all(m["latencyMs"] < 200 for m in camera.sent if m["type"] == "result")


async def test_the_rate_limit_paces_the_work_and_the_newest_frame_is_served() -> None:
    camera = Camera([b"ok", b"x" * 500, b"bad", b"late"], linger_s=0.9)
    session = LiveFrames(slow_analysis, max_fps=2, max_frame_bytes=100, frame_timeout_s=1)
    stats = await session.run(camera.receive, camera.send)
    errors = {m["frame"]: m["code"] for m in camera.sent if m["type"] == "error"}
    assert errors == {2: "PAYLOAD_TOO_LARGE"}
    results = [m for m in camera.sent if m["type"] == "result"]
    # "ok" at once; half a second later the newest frame, "late" ("bad" was replaced)
    assert [m["echo"] for m in results] == ["ok", "late"]
    assert results[1]["latencyMs"] >= 400
    assert stats.dropped == 1


async def test_a_bad_frame_does_not_end_the_stream() -> None:
    camera = Camera([b"bad", b"good"], gap_s=0.1)
    session = LiveFrames(slow_analysis, max_fps=100, max_frame_bytes=100, frame_timeout_s=1)
    await session.run(camera.receive, camera.send)
    kinds = [(m["type"], m.get("code") or m.get("echo")) for m in camera.sent]
    assert kinds == [("error", "BAD_USER_INPUT"), ("result", "good")]
