"""Scopes a credential can carry, and what each role may hold."""

from __future__ import annotations

from enum import StrEnum

from backend.core.models import UserRole


class Scope(StrEnum):
    ADMIN = "admin"  # manage users, roles, keys and read the audit log of the tenant
    KEYS = "keys"  # manage one's own API keys
    CHAT = "chat"
    VISION = "vision"
    KNOWLEDGE_READ = "knowledge:read"
    KNOWLEDGE_WRITE = "knowledge:write"
    USAGE = "usage"


ALL_SCOPES = frozenset(Scope)

ROLE_SCOPES: dict[UserRole, frozenset[Scope]] = {
    UserRole.OWNER: ALL_SCOPES,
    UserRole.ADMIN: ALL_SCOPES,
    UserRole.MEMBER: frozenset(
        {
            Scope.KEYS,
            Scope.CHAT,
            Scope.VISION,
            Scope.KNOWLEDGE_READ,
            Scope.KNOWLEDGE_WRITE,
            Scope.USAGE,
        }
    ),
    UserRole.VIEWER: frozenset({Scope.KNOWLEDGE_READ, Scope.USAGE}),
}


def parse_scopes(raw: str | list[str] | None) -> frozenset[Scope]:
    """Known scopes among `raw` (space-separated or a list); unknown names are dropped."""
    names = raw.split() if isinstance(raw, str) else (raw or [])
    return frozenset(Scope(n) for n in names if n in Scope._value2member_map_)


def grant(role: UserRole, requested: frozenset[Scope] | None) -> frozenset[Scope]:
    """What a credential of `role` gets: what it asked for, within what the role allows."""
    allowed = ROLE_SCOPES[role]
    return allowed if requested is None else allowed & requested
