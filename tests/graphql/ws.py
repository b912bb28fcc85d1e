"""A small graphql-transport-ws / graphql-ws client for tests, as an app's client library does."""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import scaled

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"


async def open_socket(url: str, protocol: str = TRANSPORT_WS, **kwargs: Any) -> ClientConnection:
    return await connect(url, subprotocols=[protocol], open_timeout=scaled(30), **kwargs)  # type: ignore[list-item]


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def receive(ws: ClientConnection, timeout: float = scaled(30)) -> dict[str, Any]:
    """The next message that is not a keep-alive ping/pong."""
    import asyncio

    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        message = json.loads(raw)
        if message.get("type") in {"ping", "pong", "ka"}:
            continue
        return message


async def init(ws: ClientConnection, payload: dict[str, Any] | None = None) -> None:
    await send(ws, {"type": "connection_init", "payload": payload or {}})
    ack = await receive(ws)
    assert ack["type"] == "connection_ack", ack


async def subscribe(
    ws: ClientConnection, query: str, variables: dict[str, Any] | None = None, op_id: str = "1"
) -> None:
    """Starts an operation on a graphql-transport-ws socket."""
    payload: dict[str, Any] = {"query": query}
    if variables is not None:
        payload["variables"] = variables
    await send(ws, {"id": op_id, "type": "subscribe", "payload": payload})


async def results(
    url: str,
    token: str,
    query: str,
    variables: dict[str, Any],
    field: str,
    timeout: float = scaled(60),
) -> list[dict[str, Any]]:
    """Every `next` of one subscription, signed in with `token`, until it completes."""
    values: list[dict[str, Any]] = []
    async with await open_socket(url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        await subscribe(ws, query, variables)
        while True:
            message = await receive(ws, timeout=timeout)
            if message["type"] == "complete":
                return values
            assert message["type"] == "next", message
            assert "errors" not in message["payload"], message
            values.append(message["payload"]["data"][field])
