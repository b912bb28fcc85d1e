"""Who may call what: Strawberry permission classes (never checks inlined in resolvers)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from strawberry.permission import BasePermission
from strawberry.types import Info

from backend.auth.errors import MissingScope
from backend.auth.principal import Principal
from backend.auth.scopes import Scope

if TYPE_CHECKING:
    from backend.graphql.context import Context

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


def until_credential_ends(
    context: Context, stream: AsyncGenerator[T, None]
) -> AsyncGenerator[T, None]:
    """Relays `stream` until the caller's credential expires or is revoked (on any replica),
    then ends it with UNAUTHENTICATED; an anonymous caller's stream ends on its own."""
    watch = context.credential_watch()
    return stream if watch is None else watch.relay(stream)


@cache
def HasScope(scope: Scope) -> type[BasePermission]:
    """A permission class: the caller holds `scope`; a denial is audited."""
    return type(
        f"Has{scope.name.title().replace('_', '')}Scope",
        (_HasScope,),
        {"scope": scope, "message": f"the {scope.value} scope is required"},
    )
