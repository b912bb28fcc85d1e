"""Tenants (organisations) and their users."""

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, Index, String, text
from sqlmodel import Field, Relationship

from backend.core.models.base import Timestamps, UUIDKey, moment, pg_enum, tenant_key


class UserRole(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


class UserKind(StrEnum):
    HUMAN = "human"
    SERVICE = "service"


class Tenant(UUIDKey, Timestamps, table=True):
    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'", name="slug_format"),)

    slug: str = Field(sa_type=String(63), unique=True)
    name: str = Field(sa_type=String(200))
    plan: str = Field(
        default="free", sa_type=String(50), sa_column_kwargs={"server_default": "free"}
    )
    is_active: bool = Field(default=True, sa_column_kwargs={"server_default": "true"})
    # Set when its erasure was asked for: it is disabled, and any replica finishes the erasure.
    erasure_requested_at: datetime | None = moment()

    users: list["User"] = Relationship(back_populates="tenant", passive_deletes=True)


class User(UUIDKey, Timestamps, table=True):
    __tablename__ = "users"
    __table_args__ = (
        # One account per email inside a tenant, whatever its case.
        Index("uq_users_tenant_id_email", "tenant_id", text("lower(email)"), unique=True),
        CheckConstraint("position('@' in email) > 1", name="email_format"),
    )

    tenant_id: uuid.UUID = tenant_key(index=True)
    email: str = Field(sa_type=String(320))
    display_name: str = Field(
        default="", sa_type=String(200), sa_column_kwargs={"server_default": ""}
    )
    role: UserRole = Field(
        default=UserRole.MEMBER,
        sa_type=pg_enum(UserRole, "user_role"),
        sa_column_kwargs={"server_default": UserRole.MEMBER.value},
    )
    kind: UserKind = Field(
        default=UserKind.HUMAN,
        sa_type=pg_enum(UserKind, "user_kind"),
        sa_column_kwargs={"server_default": UserKind.HUMAN.value},
    )
    password_hash: str | None = Field(default=None, sa_type=String(255))
    is_active: bool = Field(default=True, sa_column_kwargs={"server_default": "true"})
    erasure_requested_at: datetime | None = moment()

    tenant: Tenant = Relationship(back_populates="users")
