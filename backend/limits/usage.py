"""Settled usage, summed per day and resource (and per model version, when asked), for the
`usage` query."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.core.models import UsageRecord


@dataclass(frozen=True)
class DailyUsage:
    day: date
    resource: str
    amount: Decimal
    cost: Decimal
    model: str | None = None  # by model only
    version: str | None = None
    kind: str | None = None


async def usage_by_day(
    session: AsyncSession, days: int, user_id: uuid.UUID | None = None, *, by_model: bool = False
) -> list[DailyUsage]:
    """The tenant's (row-level security scopes it) usage for the last `days` days; `by_model`:
    one row per day, resource, model, version and kind."""
    since = datetime.now(UTC) - timedelta(days=days)
    day = func.date_trunc("day", UsageRecord.created_at).label("day")
    keys = [day, UsageRecord.resource]
    if by_model:
        keys += [UsageRecord.model, UsageRecord.version, UsageRecord.kind]
    query = (
        select(*keys, func.sum(UsageRecord.amount), func.sum(UsageRecord.cost))
        .where(UsageRecord.created_at >= since)
        .group_by(*keys)
        .order_by(*(k.asc().nulls_first() for k in keys))
    )
    if user_id is not None:
        query = query.where(UsageRecord.user_id == user_id)
    rows = await session.execute(query)
    if not by_model:
        return [DailyUsage(r[0].date(), r[1], r[2], r[3]) for r in rows]
    return [DailyUsage(r[0].date(), r[1], r[5], r[6], r[2], r[3], r[4]) for r in rows]
