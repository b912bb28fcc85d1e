"""The typed context every resolver receives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from strawberry.fastapi import BaseContext

from backend.core.state import AppState


class Context(BaseContext):
    """Per operation: the app's state; on a WebSocket also the `connection_init` payload."""

    connection_params: dict[str, Any] | None = None

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """One transaction: a mutation, or one message of a subscription."""
        async with self.state.db.session() as session:
            yield session


async def get_context(connection: HTTPConnection) -> Context:
    """FastAPI dependency: the lifespan put the app state on the connection's state."""
    return Context(state=connection.state.sightline)
