"""The audit log: one row per security event, written in the caller's unit of work."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from backend.core.models import AuditEvent


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


async def record(
    session: AsyncSession,
    event: str,
    outcome: Outcome,
    *,
    tenant_id: uuid.UUID | None = None,
    actor_id: uuid.UUID | None = None,
    ip: str | None = None,
    **details: Any,
) -> None:
    # A plain INSERT (no RETURNING): events with no tenant yet (a login for an unknown tenant)
    # may be written by the app role, though row-level security does not let it read them back.
    await session.execute(
        insert(AuditEvent).values(
            tenant_id=tenant_id,
            actor_id=actor_id,
            event=event,
            outcome=outcome.value,
            ip=ip,
            details={k: v for k, v in details.items() if v is not None},
        )
    )
