"""The model registry: models, their versions, one traffic policy per model (with every past
revision, for rollbacks), tenants' pins, and the registry's revision. Platform tables (operators
own them), except pins, which belong to a tenant (row-level security).

Kinds, statuses and sticky keys are the values of `backend.lifecycle.policy`'s enums, kept as
short strings with a CHECK listing them (infrastructure does not import the domain; a test
compares the lists)."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    Index,
    SmallInteger,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field

from backend.core.models.base import (
    TIMESTAMP,
    Base,
    Timestamps,
    UUIDKey,
    json_object,
    tenant_key,
    user_ref,
    written_at,
)

MODEL_KINDS = ("vision", "chat", "embedding", "guardrail")
VERSION_STATUSES = (
    "registered",
    "loading",
    "ready",
    "live",
    "canary",
    "shadow",
    "failed",
    "retired",
)
STICKY_KEYS = ("user", "tenant", "conversation", "none")
NAME_LENGTH = 100
VERSION_LENGTH = 64


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=name)


def _model_key(*, primary_key: bool = False) -> Any:
    """The registry model a row belongs to: deleted with it."""
    return Field(
        sa_type=String(NAME_LENGTH),
        foreign_key="registry_models.name",
        ondelete="CASCADE",
        primary_key=primary_key,
    )


class RegistryModel(Timestamps, table=True):
    """A model clients name (a vision model, a chat alias, an embedding model)."""

    __tablename__ = "registry_models"
    __table_args__ = (_one_of("kind", MODEL_KINDS, "kind_known"),)

    name: str = Field(sa_type=String(NAME_LENGTH), primary_key=True)
    kind: str = Field(sa_type=String(20))
    # classification, detection, ocr, chat, embedding, injection
    task: str = Field(sa_type=String(32))


class ModelVersionRow(UUIDKey, table=True):
    """One version of a model: its manifest (vision), endpoint spec (chat, embedding) or learned
    head (guardrail)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model", "version"),
        _one_of("status", VERSION_STATUSES, "status_known"),
    )

    model: str = _model_key()
    version: str = Field(sa_type=String(VERSION_LENGTH))
    spec: dict[str, Any] = json_object()
    sha256: str | None = Field(default=None, sa_type=String(64))
    status: str = Field(
        default="registered", sa_type=String(20), sa_column_kwargs={"server_default": "registered"}
    )
    error: str | None = Field(default=None, sa_type=String(2000))  # why it failed
    registered_by: uuid.UUID | None = user_ref(index=True)  # erasures (0008)
    registered_at: datetime = written_at()
    notes: str = Field(default="", sa_type=String(2000), sa_column_kwargs={"server_default": ""})
    updated_at: datetime = Field(
        sa_type=TIMESTAMP,
        sa_column_kwargs={"server_default": func.now(), "onupdate": func.now()},
    )


class PolicyFields(Base):
    """What a traffic policy is (the policy in force and each of its revisions)."""

    arms: list[dict[str, Any]] = Field(
        default_factory=list, sa_type=JSONB, sa_column_kwargs={"server_default": "[]"}
    )
    sticky: str = Field(
        default="user", sa_type=String(20), sa_column_kwargs={"server_default": "user"}
    )
    shadow: str | None = Field(default=None, sa_type=String(VERSION_LENGTH))
    shadow_rate: float = Field(default=0.0, sa_type=Float, sa_column_kwargs={"server_default": "0"})
    canary: dict[str, Any] | None = Field(default=None, sa_type=JSONB)


class TrafficPolicyRow(PolicyFields, Timestamps, table=True):
    """The policy in force for a model: weighted arms, sticky key, shadow, canary guard."""

    __tablename__ = "traffic_policies"
    __table_args__ = (_one_of("sticky", STICKY_KEYS, "sticky_known"),)

    model: str = _model_key(primary_key=True)
    revision: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    updated_by: uuid.UUID | None = user_ref(index=True)  # erasures (0008)


class TrafficPolicyRevision(PolicyFields, table=True):
    """Every policy a model has had, by revision: what a rollback goes back to."""

    __tablename__ = "traffic_policy_revisions"
    __table_args__ = (_one_of("sticky", STICKY_KEYS, "sticky_known"),)

    model: str = _model_key(primary_key=True)
    revision: int = Field(primary_key=True)
    # The revision a rollback of this one restores (a rollback's own: that of the one it
    # restored, so rolling back twice goes further back, never forth).
    previous_revision: int | None = None
    action: str = Field(sa_type=String(20))  # seed, set, promote, rollback
    reason: str | None = Field(default=None, sa_type=String(500))
    changed_by: uuid.UUID | None = user_ref(index=True)  # erasures (0008)
    created_at: datetime = written_at()


class ModelPin(Base, table=True):
    """A tenant's pin: every request of the tenant to the model gets this version."""

    __tablename__ = "model_pins"

    tenant_id: uuid.UUID = tenant_key(primary_key=True)
    model: str = _model_key(primary_key=True)
    version: str = Field(sa_type=String(VERSION_LENGTH))
    pinned_by: uuid.UUID | None = user_ref(index=True)  # erasures (0008)
    created_at: datetime = written_at()


class RegistryRevision(Base, table=True):
    """One row: the registry's revision, bumped by every change (under its row lock, so
    changes are serialised and replicas keep the highest revision they saw)."""

    __tablename__ = "registry_revision"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: int = Field(
        default=1, sa_type=SmallInteger, primary_key=True, sa_column_kwargs={"autoincrement": False}
    )
    revision: int = Field(default=0, sa_type=BigInteger, sa_column_kwargs={"server_default": "0"})


class DriftSnapshot(UUIDKey, table=True):
    """One comparison of a model version's current window with its reference: every signal's
    statistic, threshold and verdict (`signals`, a list of objects), kept for history. Not tied
    to the registry by a key: a version drifts whether or not the registry lists it (Tesseract)
    and its history outlives it."""

    __tablename__ = "drift_snapshots"
    __table_args__ = (Index("ix_drift_snapshots_model_version_at", "model", "version", "at"),)

    model: str = Field(sa_type=String(NAME_LENGTH))
    version: str = Field(sa_type=String(VERSION_LENGTH))
    at: datetime = written_at(index=True)  # retention purges
    requests: int = Field(default=0, sa_type=BigInteger)
    exceeded: bool = Field(default=False)
    signals: list[dict[str, Any]] = Field(
        default_factory=list, sa_type=JSONB, sa_column_kwargs={"server_default": "[]"}
    )
