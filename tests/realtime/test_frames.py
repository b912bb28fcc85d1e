"""Live frames on their own: the latest wins, the rate limit, oversized and bad frames, a
stop that answers the frames in flight, a cost budget that paces."""

from __future__ import annotations

import asyncio
from typing import Any

from backend.errors import ValidationFailed
from backend.inference.client import Overloaded
from backend.realtime.frames import End, LiveFrames


class Camera:
    """Sends `frames` as fast as the session takes them, then leaves (or asks to stop)."""

    def __init__(
        self,
        frames: list[bytes],
        gap_s: float = 0.0,
        linger_s: float = 0.3,
        end: End = End.LEFT,
    ) -> None:
        self.frames = list(frames)
        self.gap_s = gap_s
        self.linger_s = linger_s
        self.end = end
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> bytes | End:
        await asyncio.sleep(self.gap_s)
        if not self.frames:
            await asyncio.sleep(self.linger_s)  # stay a moment for the last result
            return self.end
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


async def test_a_stop_answers_the_frames_in_flight_before_the_summary() -> None:
    """The stop comes while one frame is analysed and another waits: both are answered, and
    the summary counts every frame received."""
    started = asyncio.Event()

    async def analysis(frame: bytes) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(0.3)
        return {"echo": frame.decode()}

    camera = Camera([b"a", b"b", b"c"], linger_s=0.0, end=End.STOP)
    session = LiveFrames(analysis, max_fps=1000, max_frame_bytes=100, frame_timeout_s=5)
    stats = await session.run(camera.receive, camera.send)
    assert started.is_set()
    results = [m["echo"] for m in camera.sent if m["type"] == "result"]
    assert results == ["a", "c"]  # "b" was replaced by "c" while "a" was analysed
    assert (stats.received, stats.served, stats.dropped, stats.failed) == (3, 2, 1, 0)


async def test_leaving_cancels_the_work_and_counts_it_failed() -> None:
    cancelled = asyncio.Event()

    async def analysis(frame: bytes) -> dict[str, Any]:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    camera = Camera([b"a", b"b"], linger_s=0.1, end=End.LEFT)
    session = LiveFrames(analysis, max_fps=1000, max_frame_bytes=100, frame_timeout_s=60)
    stats = await asyncio.wait_for(session.run(camera.receive, camera.send), 10)
    assert cancelled.is_set()
    assert camera.sent == []
    assert stats.received == stats.served + stats.dropped + stats.failed == 2


async def test_the_pace_holds_frames_back_and_newer_ones_replace_them() -> None:
    """A cost budget (say decode time) that asks to wait: frames that come meanwhile replace
    each other; the newest is served once the wait is over."""
    waits = iter([0.0, 1.0])
    seen: list[bytes] = []

    def pace() -> float:
        return next(waits, 0.0)

    async def analysis(frame: bytes) -> dict[str, Any]:
        seen.append(frame)
        return {}

    camera = Camera([b"a", b"b", b"c", b"d"], gap_s=0.05, linger_s=1.5)
    session = LiveFrames(analysis, max_fps=1000, max_frame_bytes=100, frame_timeout_s=1, pace=pace)
    stats = await session.run(camera.receive, camera.send)
    assert seen[0] == b"a"
    assert seen[-1] == b"d"
    assert stats.dropped >= 1


async def test_a_failed_frame_tells_its_code_never_an_internal_message() -> None:
    async def failing(frame: bytes) -> dict[str, Any]:
        if frame == b"bug":
            raise RuntimeError("connection to postgres://app:secret@10.1.2.3 failed")
        if frame == b"busy":
            raise Overloaded("worker 3 queue 512/512 at /srv/models/effnet.pt")
        raise ValidationFailed("not an image")

    camera = Camera([b"bug", b"busy", b"bad"], gap_s=0.1)
    session = LiveFrames(failing, max_fps=100, max_frame_bytes=100, frame_timeout_s=1)
    await session.run(camera.receive, camera.send)
    errors = [m for m in camera.sent if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["INFERENCE_FAILED", "OVERLOADED", "BAD_USER_INPUT"]
    assert errors[2]["message"] == "not an image"
    shown = str(errors[:2])
    assert "postgres" not in shown
    assert "/srv" not in shown
