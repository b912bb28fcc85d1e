"""The live camera socket against a live server with its inference pool: oversized frames and
pixel bombs get a per-frame error and the stream goes on; a stop answers the frames in flight;
a client that leaves mid-frame leaves no error behind."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image
from skimage import data
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from backend.config import BudgetSpec, CostSettings, Settings
from tests.agents.test_runs import gql, sign_in
from tests.conftest import scaled, serve_live
from tests.vision.test_graphql import jpeg, vision_on


async def next_message(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 60))


@contextlib.asynccontextmanager
async def live_session(url: str, token: str) -> AsyncIterator[ClientConnection]:
    """A live camera socket, signed in and ready."""
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        assert (await next_message(ws))["type"] == "ready"
        yield ws


def truncated_bomb() -> bytes:
    """About 1.8 KB of a JPEG whose header says 6000 x 6000 (36 million pixels)."""
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), "gray").save(buffer, "JPEG", quality=10)
    return buffer.getvalue()[:1800]


async def test_bad_frames_get_errors_and_the_stream_goes_on(
    chat_settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Generous frame timeout: the first frame waits for the models to warm up (seconds on a
    # busy machine); this test is about errors and accounting, not speed.
    settings = vision_on(chat_settings, live_max_fps=10_000, live_frame_timeout_s=120)
    limit = settings.vision.live_max_frame_bytes
    photo = jpeg(data.astronaut()[::2, ::2].copy())
    async with serve_live(settings) as server:
        token = await sign_in(server, account)
        url = server.ws_url.replace("/graphql", "/ws/vision/live?tasks=detect")
        async with live_session(url, token) as ws:
            # 1.5 MB (over the old 1 MB socket limit, under the frame limit): not an image
            await ws.send(b"\xff\xd8" + b"\x00" * 1_500_000)
            first = await next_message(ws)
            assert (first["type"], first["frame"]) == ("error", 1)
            assert first["code"] in {"UNSUPPORTED_MEDIA_TYPE", "UNREADABLE_IMAGE"}

            # over the frame limit, under the socket's: refused per frame, the socket stays
            await ws.send(b"\x00" * (limit + 1))
            second = await next_message(ws)
            assert (second["type"], second["frame"], second["code"]) == (
                "error",
                2,
                "PAYLOAD_TOO_LARGE",
            )

            # a pixel bomb: refused from its header, by the pixel limit
            await ws.send(truncated_bomb())
            third = await next_message(ws)
            assert (third["type"], third["frame"], third["code"]) == (
                "error",
                3,
                "PAYLOAD_TOO_LARGE",
            )
            assert "pixels" in third["message"]

            await ws.send(photo)
            fourth = await next_message(ws)
            assert (fourth["type"], fourth["frame"]) == ("result", 4), fourth

            # a stop while frames are in flight: they are answered, then the summary
            for _ in range(3):
                await ws.send(photo)
            await ws.send(json.dumps({"type": "stop"}))
            answered: list[dict[str, Any]] = []
            while (message := await next_message(ws))["type"] != "closed":
                answered.append(message)
            summary = message
        assert summary["received"] == 7
        assert summary["served"] + summary["dropped"] + summary["failed"] == 7
        assert summary["failed"] == 3
        assert {m["frame"] for m in answered} >= {7}  # the newest frame was served

        # the client leaves while its frame is analysed: nothing is logged as a server error
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            async with live_session(url, token) as ws:
                await ws.send(photo)
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)  # the server notices and closes its end
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_frames_are_charged_to_the_caller_and_refused_once_the_budget_is_spent(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    """A live session's frames cost compute like a job's: charged to the caller's budgets
    (here after every frame), recorded as usage by model version; once the money is spent the
    next frame is refused before any model runs, and so is the next session."""
    settings = vision_on(
        chat_settings, live_max_fps=10_000, live_frame_timeout_s=120, live_charge_every_s=0.001
    )
    settings.cost = CostSettings(compute_second_prices={"cpu": 1.0}, usage_flush_s=0.2)
    plan = settings.limits.default_plan
    settings.limits = settings.limits.model_copy(
        update={"budgets": {plan: {"cost": BudgetSpec(user_day=0.000001)}}}
    )
    photo = jpeg(data.astronaut()[::2, ::2].copy())
    async with serve_live(settings) as server:
        token = await sign_in(server, account)
        url = server.ws_url.replace("/graphql", "/ws/vision/live?tasks=detect")
        async with live_session(url, token) as ws:
            await ws.send(photo)
            served = await next_message(ws)
            assert (served["type"], served["frame"]) == ("result", 1), served
            await ws.send(photo)
            refused = await next_message(ws)
            assert (refused["type"], refused["frame"]) == ("error", 2), refused
            assert (refused["code"], refused["resource"]) == ("BUDGET_EXCEEDED", "cost")

        async with connect(url, max_size=None) as ws:  # the next session: refused at once
            await ws.send(json.dumps({"type": "auth", "token": token}))
            first = await next_message(ws)
            assert (first["type"], first["code"]) == ("error", "BUDGET_EXCEEDED")
            with pytest.raises(ConnectionClosed) as closed:
                await next_message(ws)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 4429

        usage = "{ usage(days: 1, byModel: true) { resource model kind cost } }"
        async with asyncio.timeout(scaled(30)):  # the ledger's next flush
            while not (rows := (await gql(server, token, usage))["data"]["usage"]):
                await asyncio.sleep(0.1)
    [row] = rows
    assert (row["resource"], row["kind"], row["model"]) == (
        "compute_seconds",
        "vision",
        settings.vision.detector,
    )
    assert float(row["cost"]) > 0
