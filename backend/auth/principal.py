"""Who is calling: resolved once per request or socket, read by every permission check."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from backend.auth.scopes import Scope
from backend.core.models import UserRole


class CredentialKind(StrEnum):
    ACCESS_TOKEN = "access_token"  # noqa: S105 (a kind name)
    API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: uuid.UUID
    tenant_id: uuid.UUID
    role: UserRole
    scopes: frozenset[Scope]
    credential: CredentialKind
    plan: str = "free"
    expires_at: float | None = None  # unix time; API keys without expiry: None
    api_key_id: uuid.UUID | None = None
    # What revocation compares: the sign-in session of an access token (its refresh-token
    # family), and when the credential was issued (an API key: verified in the database).
    session_id: uuid.UUID | None = None
    issued_at: float | None = None

    def has(self, scope: Scope) -> bool:
        return scope in self.scopes

    @property
    def subject(self) -> str:
        """The rate-limit and audit identity: the user, or the key acting for them."""
        return f"key:{self.api_key_id}" if self.api_key_id else f"user:{self.user_id}"


@dataclass(frozen=True)
class ExternalIdentity:
    """Someone an external OpenID Connect provider vouched for, signing in: not a principal
    until the auth service has found or created their user."""

    subject: str
    email: str
    name: str
    return_to: str | None
