"""Settled usage, summed per day and resource, for the `usage` query."""

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


async def usage_by_day(
    session: AsyncSession, days: int, user_id: uuid.UUID | None = None
) -> list[DailyUsage]:
    """The tenant's (row-level security scopes it) usage for the last `days` days."""
    since = datetime.now(UTC) - timedelta(days=days)
    day = func.date_trunc("day", UsageRecord.created_at).label("day")
    query = (
        select(day, UsageRecord.resource, func.sum(UsageRecord.amount), func.sum(UsageRecord.cost))
        .where(UsageRecord.created_at >= since)
        .group_by(day, UsageRecord.resource)
        .order_by(day, UsageRecord.resource)
    )
    if user_id is not None:
        query = query.where(UsageRecord.user_id == user_id)
    rows = await session.execute(query)
    return [DailyUsage(r[0].date(), r[1], r[2], r[3]) for r in rows]
