"""The live camera WebSocket: `/ws/vision/live?tasks=detect,classify`. The first message is
`{"type": "auth", "token": "<access token or API key>"}`; then every binary message is a frame
(JPEG/WebP) and every text message back is `{"type": "result" | "error", "frame": n, ...}`.
When the credential expires or is revoked, an error without a frame and a 4403 close end it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from backend.auth.errors import InvalidToken
from backend.auth.scopes import Scope
from backend.realtime.frames import LiveFrames
from backend.vision.service import VisionTask

router = APIRouter()

CLOSE_UNAUTHORISED = 4403
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAVAILABLE = 1013


@router.websocket("/ws/vision/live")
async def live_frames(
    websocket: WebSocket,
    tasks: str = "detect",
    classifier: str | None = None,
    detector: str | None = None,
) -> None:
    services = websocket.state.services
    vision = services.vision
    await websocket.accept()
    if vision is None or services.inference is None:
        await websocket.close(CLOSE_UNAVAILABLE, "vision is off on this server")
        return
    try:
        wanted = [VisionTask(t.strip().lower()) for t in tasks.split(",") if t.strip()]
    except ValueError:
        await websocket.close(CLOSE_BAD_REQUEST, "tasks: detect and/or classify")
        return
    if not wanted or VisionTask.OCR in wanted:
        await websocket.close(CLOSE_BAD_REQUEST, "tasks: detect and/or classify")
        return
    settings = websocket.state.sightline.settings.vision
    try:
        async with asyncio.timeout(settings.live_auth_timeout_s):
            hello = json.loads(await websocket.receive_text())
        principal = await services.auth.authenticate(str(hello.get("token") or ""))
    except (TimeoutError, ValueError, AttributeError, KeyError, InvalidToken, WebSocketDisconnect):
        with contextlib.suppress(RuntimeError):
            await websocket.close(CLOSE_UNAUTHORISED, "send {type: auth, token} first")
        return
    if not principal.has(Scope.VISION):
        await websocket.close(CLOSE_UNAUTHORISED, "the vision scope is needed")
        return
    await websocket.send_json({"type": "ready", "tasks": [t.value for t in wanted]})

    async def receive() -> bytes | None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                return bytes(message["bytes"])
            if message.get("text") and '"stop"' in message["text"]:
                return None

    async def send(body: dict[str, Any]) -> None:
        if websocket.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await websocket.send_json(body)

    session = LiveFrames(
        lambda frame: vision.analyse_frame(frame, wanted, classifier=classifier, detector=detector),
        max_fps=settings.live_max_fps,
        max_frame_bytes=settings.live_max_frame_bytes,
        frame_timeout_s=settings.live_frame_timeout_s,
    )
    # Served while the credential holds: revoked (on any replica) or expired, the session
    # ends and the socket closes as an unauthorised one would.
    try:
        async with services.auth.revocations.watch(principal).guard():
            stats = await session.run(receive, send)
    except InvalidToken as exc:
        await send({"type": "error", "code": exc.code, "message": exc.message})
        with contextlib.suppress(RuntimeError):
            await websocket.close(CLOSE_UNAUTHORISED, exc.message)
        return
    await send({"type": "closed", **stats.__dict__})
    with contextlib.suppress(RuntimeError):
        await websocket.close()
