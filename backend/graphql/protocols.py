"""The two WebSocket subscription protocols, hardened against messages that are not objects.

Strawberry indexes `message["type"]` directly, so valid JSON that is not an object (a list, a
number) or lacks `type` would crash the connection handler. Such a message is a protocol error.
"""

from __future__ import annotations

from typing import Any

from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler


class TransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    """graphql-transport-ws: a malformed message closes the socket with 4400, as the spec says."""

    async def handle_message(self, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.handle_invalid_message("Message must be a JSON object with a string type")
            return
        await super().handle_message(message)  # type: ignore[arg-type]


class LegacyWSHandler(BaseGraphQLWSHandler[Any, Any]):
    """graphql-ws (subscriptions-transport-ws): answer a malformed message with an error message."""

    async def handle_message(self, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.websocket.send_json(
                {"type": "error", "payload": {"message": "Invalid message"}}
            )
            return
        await super().handle_message(message)  # type: ignore[arg-type]
