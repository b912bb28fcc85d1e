"""The data protection policy of a tenant, and what purges and erasures did."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

MAX_DAYS = 36_500


class DataKind(StrEnum):
    """What a retention period applies to."""

    MESSAGES = "messages"  # conversations' messages and runs (the agent's memory of them too)
    DOCUMENTS = "documents"  # knowledge documents (with chunks) and ingestion jobs
    VISION = "vision"  # image analysis jobs and their results
    EVENTS = "events"  # the event streams of runs, ingestion jobs and vision jobs
    AUDIT = "audit"  # the tenant's audit log


def _days(description: str) -> int | None:
    return Field(None, ge=1, le=MAX_DAYS, description=description)  # type: ignore[no-any-return]


class Retention(BaseModel):
    """Days each kind of data is kept after it was created (or last changed, for documents);
    None keeps it forever."""

    model_config = ConfigDict(extra="forbid")

    messages_days: int | None = _days("messages, with their runs")
    documents_days: int | None = _days("documents not re-ingested for this long, with jobs")
    vision_days: int | None = Field(30, ge=1, le=MAX_DAYS, description="image analysis results")
    events_days: int | None = Field(1, ge=1, le=MAX_DAYS, description="replayable event streams")
    audit_days: int | None = Field(365, ge=1, le=MAX_DAYS, description="audit events")

    def days(self, kind: DataKind) -> int | None:
        value: int | None = getattr(self, f"{kind.value}_days")
        return value


class PrivacyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retention: Retention = Field(default_factory=Retention)
    store_messages_redacted: bool = Field(
        False,
        description="Users' chat messages are stored with personal data replaced, as the "
        "model gets them (the kinds of the tenant's PII rail).",
    )


class ErasureStatus(StrEnum):
    COMPLETED = "completed"
    PENDING = "pending"  # goes on in the background (and after a restart)


@dataclass
class Removed:
    """What an erasure or purge removed (or changed), by kind."""

    conversations: int = 0
    messages: int = 0
    runs: int = 0
    documents: int = 0
    ingestion_jobs: int = 0
    vision_jobs: int = 0
    event_streams: int = 0
    memory_threads: int = 0
    audit_events: int = 0
    audit_events_pseudonymised: int = 0
    usage_records_anonymised: int = 0
    users: int = 0

    def add(self, other: Removed) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


@dataclass
class Erasure:
    """The outcome of an erasure request. `subject` is the pseudonym the audit log keeps."""

    subject: str
    status: ErasureStatus
    removed: Removed = field(default_factory=Removed)


@dataclass(frozen=True)
class ExportTicket:
    """A requested export: downloaded once, by its requester, before `expires_at` (unix)."""

    id: str
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    requested_by: uuid.UUID | None
    expires_at: float
