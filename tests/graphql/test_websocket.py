"""Subscriptions over a real WebSocket on a real uvicorn server, both protocols, and bad clients."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import ConnectionClosed

from backend.config import Settings
from tests.conftest import LiveServer, serve_live
from tests.graphql.ws import LEGACY_WS, init, open_socket, receive, send

HEARTBEAT = "subscription Beat($n: Int) { heartbeat(intervalMs: 100, count: $n) { seq at } }"


async def test_heartbeat_ticks_over_graphql_transport_ws(live_server: LiveServer) -> None:
    async with await open_socket(live_server.ws_url) as ws:
        await init(ws)
        await send(
            ws,
            {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": HEARTBEAT, "variables": {"n": 3}},
            },
        )
        ticks = [await receive(ws) for _ in range(3)]
        assert [t["type"] for t in ticks] == ["next"] * 3
        assert [t["payload"]["data"]["heartbeat"]["seq"] for t in ticks] == [0, 1, 2]
        assert (await receive(ws)) == {"id": "1", "type": "complete"}


async def test_heartbeat_ticks_over_legacy_graphql_ws(live_server: LiveServer) -> None:
    async with await open_socket(live_server.ws_url, LEGACY_WS) as ws:
        await init(ws)
        await send(
            ws, {"id": "a", "type": "start", "payload": {"query": HEARTBEAT, "variables": {"n": 2}}}
        )
        first, second = await receive(ws), await receive(ws)
        assert first["type"] == second["type"] == "data"
        assert second["payload"]["data"]["heartbeat"]["seq"] == 1
        assert (await receive(ws))["type"] == "complete"


async def test_invalid_interval_is_a_typed_error(live_server: LiveServer) -> None:
    async with await open_socket(live_server.ws_url) as ws:
        await init(ws)
        await send(
            ws,
            {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": "subscription { heartbeat(intervalMs: 1) { seq } }"},
            },
        )
        message = await receive(ws)
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "BAD_USER_INPUT"
        assert errors[0]["extensions"]["field"] == "intervalMs"


async def _close_code(ws: object) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        await receive(ws, timeout=5)  # type: ignore[arg-type]
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def test_subscribe_before_connection_init_closes_4401(live_server: LiveServer) -> None:
    async with await open_socket(live_server.ws_url) as ws:
        await send(ws, {"id": "1", "type": "subscribe", "payload": {"query": HEARTBEAT}})
        assert await _close_code(ws) == 4401


MALFORMED_SUBSCRIBES = [
    {"id": "1", "type": "subscribe", "payload": "x"},
    {"id": "1", "type": "subscribe", "payload": None},
    {"id": "1", "type": "subscribe"},
    {"id": "1", "type": "subscribe", "payload": {"query": 5}},
    {"id": "1", "type": "subscribe", "payload": {}},
    {"id": 1, "type": "subscribe", "payload": {"query": HEARTBEAT}},
    {"id": "", "type": "subscribe", "payload": {"query": HEARTBEAT}},
    {"type": "subscribe", "payload": {"query": HEARTBEAT}},
    {"id": "1", "type": "subscribe", "payload": {"query": HEARTBEAT, "variables": [1]}},
    {"id": "1", "type": "subscribe", "payload": {"query": HEARTBEAT, "operationName": 3}},
    {"id": "1", "type": "subscribe", "payload": {"query": HEARTBEAT, "extensions": "e"}},
    {"id": 7, "type": "complete"},
]


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        json.dumps({"type": "no-such-type"}),
        json.dumps([1, 2]),
        *(json.dumps(m) for m in MALFORMED_SUBSCRIBES),
    ],
)
async def test_malformed_messages_close_4400_and_others_keep_working(
    live_server: LiveServer, raw: str
) -> None:
    async with await open_socket(live_server.ws_url) as healthy:
        await init(healthy)
        async with await open_socket(live_server.ws_url) as bad:
            await init(bad)
            await bad.send(raw)
            assert await _close_code(bad) == 4400
        await send(
            healthy,
            {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": HEARTBEAT, "variables": {"n": 1}},
            },
        )
        assert (await receive(healthy))["type"] == "next"


async def test_invalid_document_is_an_error_message(live_server: LiveServer) -> None:
    async with await open_socket(live_server.ws_url) as ws:
        await init(ws)
        await send(ws, {"id": "1", "type": "subscribe", "payload": {"query": "subscription {"}})
        message = await receive(ws)
        assert message["type"] == "error"
        assert message["payload"][0]["extensions"]["code"] == "GRAPHQL_PARSE_FAILED"


async def test_client_that_leaves_ends_its_subscription(live_server: LiveServer) -> None:
    gauge = live_server.app.state.metrics.subscriptions_active
    async with await open_socket(live_server.ws_url) as ws:
        await init(ws)
        await send(
            ws,
            {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": HEARTBEAT, "operationName": "Beat"},
            },
        )
        assert (await receive(ws))["type"] == "next"
        assert gauge.labels("Beat")._value.get() == 1
    async with asyncio.timeout(5):
        while gauge.labels("Beat")._value.get() != 0:
            await asyncio.sleep(0.02)


async def test_silent_client_is_closed_after_init_timeout(
    settings: Settings, engine: object
) -> None:
    settings.graphql.connection_init_timeout_s = 0.3
    async with serve_live(settings) as server, await open_socket(server.ws_url) as ws:
        assert await _close_code(ws) == 4408


async def test_oversized_message_closes_1009(live_server: LiveServer, settings: Settings) -> None:
    async with await open_socket(live_server.ws_url) as ws:
        await init(ws)
        await ws.send("x" * (settings.server.max_ws_message_bytes + 1))
        assert await _close_code(ws) == 1009


@pytest.mark.parametrize(
    "raw",
    [
        "[1, 2]",
        json.dumps({"id": "x"}),
        json.dumps({"id": "b", "type": "start", "payload": "x"}),
        json.dumps({"id": "b", "type": "start", "payload": None}),
        json.dumps({"id": "b", "type": "start", "payload": {"query": 5}}),
        json.dumps({"id": 2, "type": "start", "payload": {"query": HEARTBEAT}}),
        json.dumps({"type": "stop"}),
    ],
)
async def test_legacy_protocol_answers_malformed_messages_with_error(
    live_server: LiveServer, raw: str
) -> None:
    async with await open_socket(live_server.ws_url, LEGACY_WS) as ws:
        await init(ws)
        await ws.send(raw)
        assert (await receive(ws))["type"] == "error"
        await send(
            ws, {"id": "a", "type": "start", "payload": {"query": HEARTBEAT, "variables": {"n": 1}}}
        )
        assert (await receive(ws))["type"] == "data"


async def test_the_subscription_limit_is_a_typed_error(settings: Settings, engine: object) -> None:
    settings.graphql.max_subscriptions_per_connection = 2
    forever = "subscription { heartbeat(intervalMs: 1000) { seq } }"
    async with serve_live(settings) as server:
        async with await open_socket(server.ws_url) as ws:
            await init(ws)
            for op_id in ("1", "2", "3"):
                await send(ws, {"id": op_id, "type": "subscribe", "payload": {"query": forever}})
            refused = await receive(ws)
            while refused["type"] != "error":
                refused = await receive(ws)
            assert refused["id"] == "3"
            (error,) = refused["payload"]
            assert error["extensions"] == {"code": "SUBSCRIPTION_LIMIT_REACHED", "limit": 2}
        async with await open_socket(server.ws_url, LEGACY_WS) as ws:
            await init(ws)
            for op_id in ("1", "2", "3"):
                await send(ws, {"id": op_id, "type": "start", "payload": {"query": forever}})
            refused = await receive(ws)
            while refused["type"] != "error":
                refused = await receive(ws)
            assert refused["id"] == "3"
            assert refused["payload"]["extensions"]["code"] == "SUBSCRIPTION_LIMIT_REACHED"


async def test_legacy_protocol_refuses_a_bad_token_with_4403(live_server: LiveServer) -> None:
    async with await open_socket(live_server.ws_url, LEGACY_WS) as ws:
        await send(ws, {"type": "connection_init", "payload": {"authorization": "Bearer nope"}})
        error = await receive(ws)
        assert error["type"] == "connection_error"
        assert await _close_code(ws) == 4403
