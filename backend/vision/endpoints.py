"""The live camera WebSocket: `/ws/vision/live?tasks=detect,classify`. The first message is
`{"type": "auth", "token": "<access token or API key>"}`; then every binary message is a frame
(JPEG/WebP) and every text message back is `{"type": "result" | "error", "frame": n, ...}`.
When the credential expires or is revoked, an error without a frame and a 4403 close end it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from backend.auth.errors import InvalidToken
from backend.auth.principal import Principal
from backend.auth.scopes import Scope
from backend.core import untrusted
from backend.errors import AppError, ServiceUnavailable, expected_error
from backend.limits.budgets import BudgetExceeded
from backend.realtime.frames import End, LiveFrames
from backend.vision.images import DecodeBudget
from backend.vision.metering import FrameMeter
from backend.vision.service import VisionTask, job_key

router = APIRouter()

log = logging.getLogger(__name__)

CLOSE_UNAUTHORISED = 4403
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAVAILABLE = 1013
CLOSE_BUDGET_EXCEEDED = 4429  # the caller's compute or money budget is used up


@contextlib.contextmanager
def _client_may_be_gone() -> Iterator[None]:
    """Sending to (or closing) a socket whose client already left is not an error: there is
    nobody to tell (Starlette raises WebSocketDisconnect, or RuntimeError once closed)."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        yield


async def _close(websocket: WebSocket, code: int = 1000, reason: str = "") -> None:
    if websocket.application_state is WebSocketState.DISCONNECTED:
        return
    with _client_may_be_gone():
        await websocket.close(code, reason)


async def _send(websocket: WebSocket, body: dict[str, Any]) -> None:
    if websocket.client_state is WebSocketState.CONNECTED:
        with _client_may_be_gone():
            await websocket.send_json(body)


async def _refuse(websocket: WebSocket, error: AppError) -> None:
    """A typed error without a frame, then the close: "try again later" when a backing service
    is down (the credential may be fine: the GraphQL socket does not reject it either), else
    unauthorised."""
    await _send(websocket, {"type": "error", **error.extensions, "message": error.message})
    unavailable = isinstance(error, ServiceUnavailable)
    await _close(websocket, CLOSE_UNAVAILABLE if unavailable else CLOSE_UNAUTHORISED, error.message)


@router.websocket("/ws/vision/live")
async def live_frames(
    websocket: WebSocket,
    tasks: str = "detect",
    classifier: str | None = None,
    detector: str | None = None,
) -> None:
    await websocket.accept()
    wanted = await _tasks_served(websocket, tasks)
    if wanted is None:
        return
    principal = await _signed_in(websocket)
    if principal is None:
        return
    await _serve(websocket, principal, wanted, classifier=classifier, detector=detector)


async def _tasks_served(websocket: WebSocket, tasks: str) -> list[VisionTask] | None:
    """The tasks asked for, or None once the socket is closed with why they cannot be served."""
    services = websocket.state.services
    if services.vision is None or services.inference is None:
        await _close(websocket, CLOSE_UNAVAILABLE, "vision is off on this server")
        return None
    try:
        wanted = [VisionTask(t.strip().lower()) for t in tasks.split(",") if t.strip()]
    except ValueError:
        wanted = []
    if not wanted or VisionTask.OCR in wanted:
        await _close(websocket, CLOSE_BAD_REQUEST, "tasks: detect and/or classify")
        return None
    return wanted


async def _signed_in(websocket: WebSocket) -> Principal | None:
    """The caller named by the first message, or None once the socket is closed with why not."""
    server = websocket.state.sightline.settings
    try:
        async with asyncio.timeout(server.vision.live_auth_timeout_s):
            hello = untrusted.loads(
                await websocket.receive_text(),
                max_depth=server.server.max_json_depth,
                max_values=server.server.max_json_values,
            )
        token = hello.get("token") if isinstance(hello, dict) else None
        principal = await websocket.state.services.auth.authenticate(
            token if isinstance(token, str) else ""
        )
    except (TimeoutError, ValueError, KeyError, InvalidToken, WebSocketDisconnect, RuntimeError):
        await _close(websocket, CLOSE_UNAUTHORISED, "send {type: auth, token} first")
        return None
    except Exception as exc:  # PostgreSQL or Redis down: typed, never the driver's message
        typed = expected_error(exc)
        if typed is None:
            raise
        await _refuse(websocket, typed)
        return None
    if not principal.has(Scope.VISION):
        await _close(websocket, CLOSE_UNAUTHORISED, "the vision scope is needed")
        return None
    return principal


async def _serve(
    websocket: WebSocket,
    principal: Principal,
    wanted: list[VisionTask],
    *,
    classifier: str | None,
    detector: str | None,
) -> None:
    """Frames in, results out, while the credential holds: revoked (on any replica) or expired,
    the session ends and the socket closes as an unauthorised one would."""
    services = websocket.state.services
    vision = services.vision
    settings = websocket.state.sightline.settings.vision

    async def receive() -> bytes | End:
        while True:
            try:
                message = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return End.LEFT
            if message["type"] == "websocket.disconnect":
                return End.LEFT
            if message.get("bytes") is not None:
                return bytes(message["bytes"])
            if message.get("text") and '"stop"' in message["text"]:
                return End.STOP

    async def send(body: dict[str, Any]) -> None:
        await _send(websocket, body)

    meter = FrameMeter(
        principal, services.budgets, services.ledger, every_s=settings.live_charge_every_s
    )
    try:
        await meter.admit()
    except Exception as exc:  # money spent, or Redis down: typed, never the driver's message
        typed = expected_error(exc)
        if typed is None:
            raise
        await _send(websocket, {"type": "error", **typed.extensions, "message": typed.message})
        spent = isinstance(typed, BudgetExceeded)
        await _close(
            websocket, CLOSE_BUDGET_EXCEEDED if spent else CLOSE_UNAVAILABLE, typed.message
        )
        return
    await send({"type": "ready", "tasks": [t.value for t in wanted]})
    budget = DecodeBudget(settings.live_decode_share, settings.live_decode_burst_s)
    # who asks, for version routing: a sticky policy keeps the user on one version
    key = job_key(principal.tenant_id, principal.user_id, uuid.uuid4().hex)

    async def analyse(frame: bytes) -> dict[str, Any]:
        meter.check()  # a budget used up: refused before any model runs
        result = await vision.analyse_frame(
            frame,
            wanted,
            classifier=classifier,
            detector=detector,
            budget=budget,
            key=key,
            spent=meter.add,
        )
        await meter.charge_if_due()
        return result

    session = LiveFrames(
        analyse,
        max_fps=settings.live_max_fps,
        max_frame_bytes=settings.live_max_frame_bytes,
        frame_timeout_s=settings.live_frame_timeout_s,
        pace=budget.wait_s,
    )
    try:
        async with services.auth.revocations.watch(principal).guard():
            stats = await session.run(receive, send)
    except InvalidToken as exc:
        await _refuse(websocket, exc)
        return
    finally:  # what the last frames took, however the session ended
        try:
            await asyncio.shield(meter.charge())
        except Exception as exc:  # served already: the ledger or Redis failing loses the charge
            log.warning("live session of %s: last charge failed: %r", principal.subject, exc)
    await send({"type": "closed", **stats.__dict__})
    await _close(websocket)
