"""The one-worker server's main loop: it wakes once a second, not ten times, yet its Date
header stays current and an exit request stops it (a signal to `serve`: tests/test_cli.py)."""

from __future__ import annotations

import asyncio
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import uvicorn

from backend.core.server import QuietServer
from tests.conftest import free_port, scaled


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_the_date_header_moves_on_and_an_exit_request_stops_the_server() -> None:
    port = free_port()
    server = QuietServer(uvicorn.Config(_app, host="127.0.0.1", port=port, log_config=None))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(scaled(20)):
            while not server.started:
                await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            first = parsedate_to_datetime((await http.get("/")).headers["date"])
            await asyncio.sleep(2.5)
            later = parsedate_to_datetime((await http.get("/")).headers["date"])
        assert (later - first).total_seconds() >= 1
        server.should_exit = True  # as handle_exit does on SIGTERM (tested by test_cli)
        server.wake()
        async with asyncio.timeout(scaled(20)):
            await serving  # it ends by itself (how soon is not asserted here)
    finally:
        serving.cancel()
