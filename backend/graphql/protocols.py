"""The two WebSocket subscription protocols, hardened against messages of the wrong shape.

Strawberry indexes messages directly (`message["type"]`, `message["payload"]["query"]`), so valid
JSON of another shape crashed the connection handler and dropped the socket without a close
frame. Every message is checked here first:
- graphql-transport-ws: a malformed message closes the socket with 4400, as the protocol says.
- graphql-ws (legacy): a malformed message is answered with an `error` message; the socket stays.
A refused credential closes with 4403 on both (Strawberry closes the legacy one with 1011), and
the subscription limit is a typed error (`SUBSCRIPTION_LIMIT_REACHED`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from graphql import GraphQLError
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.types.unset import UnsetType

SUBSCRIPTION_LIMIT = "SUBSCRIPTION_LIMIT_REACHED"
FORBIDDEN = 4403


def operation_problem(message: dict[str, Any], payload_key: str = "payload") -> str | None:
    """What is wrong with a subscribe/start message, or None: an id that is a non-empty string,
    a payload object whose query is a string, optional variables, operationName, extensions."""
    op_id = message.get("id")
    if not isinstance(op_id, str) or not op_id:
        return "id must be a non-empty string"
    payload = message.get(payload_key)
    if not isinstance(payload, dict):
        return "payload must be an object"
    if not isinstance(payload.get("query"), str):
        return "payload.query must be a string"
    for key, kind, name in (
        ("variables", dict, "an object"),
        ("extensions", dict, "an object"),
        ("operationName", str, "a string"),
    ):
        if payload.get(key) is not None and not isinstance(payload[key], kind):
            return f"payload.{key} must be {name} or null"
    return None


def _limit_error(limit: int) -> dict[str, Any]:
    return GraphQLError(
        f"subscription limit reached: at most {limit} operations on one connection",
        extensions={"code": SUBSCRIPTION_LIMIT, "limit": limit},
    ).formatted


class TransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    """graphql-transport-ws: a malformed message closes the socket with 4400."""

    async def handle_message(self, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.handle_invalid_message("Message must be a JSON object with a string type")
            return
        kind = message["type"]
        problem = None
        if kind == "subscribe":
            problem = operation_problem(message)
        elif kind == "complete" and not isinstance(message.get("id"), str):
            problem = "id must be a string"
        if problem is not None:
            await self.handle_invalid_message(f"Invalid {kind} message: {problem}")
            return
        await super().handle_message(message)  # type: ignore[arg-type]

    async def handle_subscribe(self, message: Any) -> None:
        limit = self.max_subscriptions_per_connection
        if (
            self.connection_acknowledged
            and limit is not None
            and message["id"] not in self.operations
            and len(self.operations) >= limit
        ):
            await self.send_message(
                {"id": message["id"], "type": "error", "payload": [_limit_error(limit)]}
            )
            return
        await super().handle_subscribe(message)


class LegacyWSHandler(BaseGraphQLWSHandler[Any, Any]):
    """graphql-ws (subscriptions-transport-ws): a malformed message gets an error message."""

    async def handle_message(self, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self._error(None, "Invalid message: a JSON object with a string type")
            return
        kind = message["type"]
        problem = None
        if kind == "start":
            problem = operation_problem(message)
        elif kind == "stop" and not isinstance(message.get("id"), str):
            problem = "id must be a string"
        if problem is not None:
            op_id = message.get("id") if isinstance(message.get("id"), str) else None
            await self._error(op_id, f"Invalid {kind} message: {problem}")
            return
        await super().handle_message(message)  # type: ignore[arg-type]

    async def _error(self, op_id: str | None, text: str, code: str = "BAD_REQUEST") -> None:
        message: dict[str, Any] = {
            "type": "error",
            "payload": {"message": text, "extensions": {"code": code}},
        }
        if op_id is not None:
            message["id"] = op_id
        await self.websocket.send_json(message)

    async def handle_connection_init(self, message: Any) -> None:
        """As Strawberry's, but a refused credential closes with 4403, not 1011 (a server
        error, which clients retry)."""
        payload = message.get("payload")
        if payload is not None and not isinstance(payload, dict):
            await self.send_message({"type": "connection_error"})
            await self.websocket.close(code=1000, reason="")
            return
        self.context.connection_params = payload
        try:
            ack_payload = await self.view.on_ws_connect(self.context)
        except ConnectionRejectionError as rejected:
            await self.send_message({"type": "connection_error", "payload": rejected.payload})
            await self.websocket.close(code=FORBIDDEN, reason="Forbidden")
            return
        if isinstance(ack_payload, UnsetType) or ack_payload is None:
            await self.send_message({"type": "connection_ack"})
        else:
            await self.send_message({"type": "connection_ack", "payload": ack_payload})
        self.connection_acknowledged = True
        if self.keep_alive:
            self.keep_alive_task = asyncio.create_task(self.handle_keep_alive())

    async def handle_start(self, message: Any) -> None:
        limit = self.max_subscriptions_per_connection
        if (
            self.connection_acknowledged
            and limit is not None
            and message["id"] not in self.tasks
            and len(self.tasks) >= limit
        ):
            await self.websocket.send_json(
                {"type": "error", "id": message["id"], "payload": _limit_error(limit)}
            )
            return
        await super().handle_start(message)
