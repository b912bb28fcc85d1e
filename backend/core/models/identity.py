"""Credentials and the records kept about them: signing keys, refresh tokens, API keys,
OAuth clients, the audit log and usage records."""

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Column, Identity, Numeric, String
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field

from backend.core.models.base import (
    TIMESTAMP,
    Base,
    UUIDKey,
    by_tenant_and_age,
    json_object,
    moment,
    tenant_key,
    user_key,
    user_ref,
    written_at,
)


def _scopes() -> Any:
    return Field(sa_type=ARRAY(String))


class SigningKey(Base, table=True):
    """A key that signs access tokens. Retired keys still verify until their tokens expire."""

    __tablename__ = "signing_keys"

    kid: str = Field(sa_type=String(64), primary_key=True)
    alg: str = Field(sa_type=String(20))
    public_jwk: dict[str, Any] = Field(sa_type=JSONB)
    private_key_encrypted: bytes
    created_at: datetime = written_at()
    retired_at: datetime | None = moment()


class RefreshToken(UUIDKey, table=True):
    """One refresh token of a rotation family; reuse of a used one revokes the family."""

    __tablename__ = "refresh_tokens"

    tenant_id: uuid.UUID = tenant_key()
    user_id: uuid.UUID = user_key(index=True)
    family_id: uuid.UUID = Field(index=True)
    token_hash: bytes = Field(unique=True)
    scopes: list[str] = _scopes()
    created_at: datetime = written_at()
    expires_at: datetime = Field(sa_type=TIMESTAMP)
    used_at: datetime | None = moment()
    revoked_at: datetime | None = moment()


class ApiKey(UUIDKey, table=True):
    """A server-to-server key: shown once, stored as a hash, found by its public prefix."""

    __tablename__ = "api_keys"

    tenant_id: uuid.UUID = tenant_key()
    user_id: uuid.UUID = user_key(index=True)
    name: str = Field(sa_type=String(100))
    prefix: str = Field(sa_type=String(32), unique=True)
    secret_hash: bytes
    scopes: list[str] = _scopes()
    created_at: datetime = written_at()
    expires_at: datetime | None = moment()
    last_used_at: datetime | None = moment()
    revoked_at: datetime | None = moment()


class OAuthClient(UUIDKey, table=True):
    """A service account's client_credentials: client id and hashed secret, bound to a user."""

    __tablename__ = "oauth_clients"

    tenant_id: uuid.UUID = tenant_key()
    user_id: uuid.UUID = user_key(index=True)  # erasures (migration 0008)
    client_id: str = Field(sa_type=String(64), unique=True)
    secret_hash: bytes
    scopes: list[str] = _scopes()
    created_at: datetime = written_at()
    revoked_at: datetime | None = moment()


class AuditEvent(Base, table=True):
    """A security event: logins, failures, token reuse, key changes, permission denials."""

    __tablename__ = "audit_events"
    __table_args__ = (
        by_tenant_and_age("audit_events"),  # purges (0008)
        # No RETURNING: rows without a tenant are writable but not readable by the app role.
        {"implicit_returning": False},
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    tenant_id: uuid.UUID | None = Field(
        default=None, foreign_key="tenants.id", ondelete="CASCADE", index=True
    )
    actor_id: uuid.UUID | None = Field(default=None, index=True)  # erasures (0008)
    event: str = Field(sa_type=String(64), index=True)
    outcome: str = Field(sa_type=String(16))
    ip: str | None = Field(default=None, sa_type=String(64))
    details: dict[str, Any] = json_object()
    created_at: datetime = written_at(index=True)


class UsageRecord(UUIDKey, table=True):
    """What one run or job consumed, settled: LLM tokens and compute seconds, with cost, and the
    model version that consumed it (null on records from before migration 0014)."""

    __tablename__ = "usage_records"
    __table_args__ = (
        # budgets sum a tenant's usage since a moment (migration 0002)
        by_tenant_and_age("usage_records"),
    )

    tenant_id: uuid.UUID = tenant_key()
    user_id: uuid.UUID | None = user_ref(index=True)  # erasures (migration 0008)
    resource: str = Field(sa_type=String(32))
    subject: str = Field(sa_type=String(100))
    amount: Decimal = Field(sa_type=Numeric(20, 6))
    cost: Decimal = Field(
        default=Decimal(0), sa_type=Numeric(20, 6), sa_column_kwargs={"server_default": "0"}
    )
    model: str | None = Field(default=None, sa_type=String(100))
    version: str | None = Field(default=None, sa_type=String(64))
    kind: str | None = Field(default=None, sa_type=String(16))  # chat, vision, embedding
    created_at: datetime = written_at(index=True)
