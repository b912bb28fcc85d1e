"""Who may call what: Strawberry permission classes (never checks inlined in resolvers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from functools import cache
from typing import Any, TypeVar

from strawberry.permission import BasePermission
from strawberry.types import Info

from backend.auth.errors import InvalidToken, MissingScope
from backend.auth.principal import Principal
from backend.auth.scopes import Scope

T = TypeVar("T")


class IsAuthenticated(BasePermission):
    message = "authentication required"

    def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        info.context.require_principal()  # raises UNAUTHENTICATED with the precise reason
        return True


class _HasScope(BasePermission):
    scope: Scope

    async def has_permission(self, source: Any, info: Info, **kwargs: Any) -> bool:
        principal: Principal = info.context.require_principal()
        if not principal.has(self.scope):
            await info.context.services.auth.record_denial(
                principal, f"{info.path.typename}.{info.field_name}", info.context.client_ip
            )
            raise MissingScope(self.message, scope=self.scope.value)
        return True


async def until_credential_expires(
    principal: Principal | None, stream: AsyncIterator[T]
) -> AsyncGenerator[T, None]:
    """Relays `stream` until the caller's credential expires, then ends it with UNAUTHENTICATED."""
    try:
        while True:
            remaining = (
                None
                if principal is None or principal.expires_at is None
                else (principal.expires_at - time.time())
            )
            if remaining is not None and remaining <= 0:
                raise InvalidToken("credential expired; reconnect with a fresh token")
            try:
                async with asyncio.timeout(remaining):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise InvalidToken("credential expired; reconnect with a fresh token") from None
            yield item
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


@cache
def HasScope(scope: Scope) -> type[BasePermission]:
    """A permission class: the caller holds `scope`; a denial is audited."""
    return type(
        f"Has{scope.name.title().replace('_', '')}Scope",
        (_HasScope,),
        {"scope": scope, "message": f"the {scope.value} scope is required"},
    )
