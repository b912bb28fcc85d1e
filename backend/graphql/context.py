"""The typed context every resolver receives: state, services, and who is calling."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from strawberry.fastapi import BaseContext

from backend.auth.errors import InvalidToken
from backend.auth.principal import Principal
from backend.auth.revocation import EXPIRED, CredentialWatch
from backend.core.state import AppState
from backend.errors import AppError, ServiceUnavailable, Unauthenticated, expected_error

if TYPE_CHECKING:
    from backend.services import Services


class Context(BaseContext):
    """Per operation (HTTP) or per connection (WebSocket)."""

    connection_params: dict[str, Any] | None = None

    def __init__(
        self,
        state: AppState,
        services: Services,
        principal: Principal | None = None,
        auth_error: AppError | None = None,
        client_ip: str | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.services = services
        self.principal = principal
        # Why there is no principal: a bad credential, or a backing service down.
        self.auth_error = auth_error
        self.client_ip = client_ip
        self.rate_limit: dict[str, Any] | None = None  # reported in response extensions
        self._watch: CredentialWatch | None = None

    def require_principal(self) -> Principal:
        """The caller, or the reason there is none (a bad credential, or no credential).

        On a socket the credential is checked again at every use: it may have expired or been
        revoked since the socket authenticated."""
        if self.principal is not None:
            if self._watch is not None:
                self._watch.check()
            elif self.principal.expires_at is not None and self.principal.expires_at <= (
                time.time()
            ):
                raise InvalidToken(EXPIRED)
            return self.principal
        if self.auth_error is not None:
            raise self.auth_error
        raise Unauthenticated("authentication required")

    def credential_watch(self) -> CredentialWatch | None:
        """What ends this caller's open streams when the credential is revoked: one per
        socket (or streaming request), made at first use; None when anonymous."""
        if self.principal is None:
            return None
        if self._watch is None:
            self._watch = self.services.auth.revocations.watch(self.principal)
        return self._watch

    async def authenticate(self, credential: str) -> None:
        """Sets the principal, or the typed reason there is none. A backing service that is
        down is SERVICE_UNAVAILABLE, never a driver's message or address."""
        try:
            self.principal = await self.services.auth.authenticate(credential)
        except InvalidToken as exc:
            self.auth_error = exc
        except Exception as exc:
            typed = expected_error(exc)
            if not isinstance(typed, ServiceUnavailable):
                raise
            self.auth_error = typed

    @property
    def rate_subject(self) -> str:
        return self.principal.subject if self.principal else f"ip:{self.client_ip or 'unknown'}"

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """One transaction in the caller's tenant: a mutation, or one subscription message."""
        async with self.state.db.session(self.require_principal().tenant_id) as session:
            yield session


def credential_of(connection: HTTPConnection) -> str | None:
    header = connection.headers.get("authorization") or connection.headers.get("x-api-key")
    return header or None


async def get_context(connection: HTTPConnection) -> Context:
    """FastAPI dependency: the lifespan put state and services on the connection's state."""
    services = connection.state.services
    context = Context(
        state=connection.state.sightline,
        services=services,
        client_ip=connection.client.host if connection.client else None,
    )
    credential = credential_of(connection)
    if credential is not None and connection.scope["type"] == "http":
        await context.authenticate(credential)
    return context
