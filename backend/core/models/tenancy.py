"""Tenants (organisations) and their users."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, DateTime, Enum, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from backend.core.models.base import Base, Timestamps, UUIDKey


class UserRole(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


class UserKind(StrEnum):
    HUMAN = "human"
    SERVICE = "service"


class Tenant(UUIDKey, Timestamps, Base):
    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'", name="slug_format"),)

    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[str] = mapped_column(String(50), default="free", server_default="free")
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    # Set when its erasure was asked for: it is disabled, and any replica finishes the erasure.
    erasure_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    users: Mapped[list[User]] = relationship(back_populates="tenant", passive_deletes=True)


class User(UUIDKey, Timestamps, Base):
    __tablename__ = "users"
    __table_args__ = (
        # One account per email inside a tenant, whatever its case.
        Index("uq_users_tenant_id_email", "tenant_id", text("lower(email)"), unique=True),
        CheckConstraint("position('@' in email) > 1", name="email_format"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(320))
    display_name: Mapped[str] = mapped_column(String(200), default="", server_default="")
    role: Mapped[UserRole] = mapped_column(
        Enum(UserRole, name="user_role", values_callable=lambda e: [m.value for m in e]),
        default=UserRole.MEMBER,
        server_default=UserRole.MEMBER.value,
    )
    kind: Mapped[UserKind] = mapped_column(
        Enum(UserKind, name="user_kind", values_callable=lambda e: [m.value for m in e]),
        default=UserKind.HUMAN,
        server_default=UserKind.HUMAN.value,
    )
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    erasure_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tenant: Mapped[Tenant] = relationship(back_populates="users")
