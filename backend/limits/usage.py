"""Usage records: written per model version (in the caller's unit of work, or summed in memory
by the ledger for calls that have none), and summed per day and resource (and per model
version, when asked) for the `usage` query."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.core.db import Database
from backend.core.models import UsageRecord
from backend.core.retry import is_transient
from backend.core.tasks import Periodic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsagePart:
    """What one model version consumed of a settled reservation, recorded apart (a vision job's
    tasks run on different models)."""

    model: str
    version: str
    kind: str
    amount: Decimal
    cost: Decimal


def merged(parts: Iterable[UsagePart]) -> list[UsagePart]:
    """The parts summed per model, version and kind (a job's many embedding calls: one row)."""
    sums: dict[tuple[str, str, str], tuple[Decimal, Decimal]] = {}
    for part in parts:
        key = (part.model, part.version, part.kind)
        amount, cost = sums.get(key, (Decimal(0), Decimal(0)))
        sums[key] = (amount + part.amount, cost + part.cost)
    return [UsagePart(*key, amount, cost) for key, (amount, cost) in sums.items()]


def add_usage(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID | None,
    resource: str,
    subject: str,
    parts: Iterable[UsagePart],
) -> None:
    """One usage record per part, added to the caller's unit of work (written when it flushes)."""
    for part in parts:
        session.add(
            UsageRecord(
                tenant_id=tenant_id,
                user_id=user_id,
                resource=resource,
                subject=subject,
                amount=part.amount,
                cost=part.cost,
                model=part.model or None,
                version=part.version or None,
                kind=part.kind or None,
            )
        )


_Key = tuple[uuid.UUID, uuid.UUID | None, str, str, str, str, str]


class UsageLedger:
    """Usage of calls that have no unit of work of their own (a search's query embedding, an
    `/v1/embeddings` request), summed in memory and written every `flush_s` by its own task:
    one record per tenant, user, resource, subject and model version a flush, and no database
    round trip on the call's path. Their money is charged in Redis as they happen; what a
    replica had not written when it died (at most `flush_s` of such calls) has no record."""

    def __init__(self, db: Database, *, flush_s: float, timeout_s: float) -> None:
        self._db = db
        self._timeout_s = timeout_s
        self._due: dict[_Key, tuple[Decimal, Decimal]] = {}
        self._flusher = Periodic(
            "usage-ledger", self.flush, interval_s=flush_s, timeout_s=timeout_s
        )

    def add(
        self,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        resource: str,
        subject: str,
        part: UsagePart,
    ) -> None:
        """Counts a call's usage for the next flush (no I/O)."""
        key = (tenant_id, user_id, resource, subject, part.model, part.version, part.kind)
        amount, cost = self._due.get(key, (Decimal(0), Decimal(0)))
        self._due[key] = (amount + part.amount, cost + part.cost)

    def start(self) -> None:
        self._flusher.start()

    async def close(self) -> None:
        """Stops the periodic flush and writes what is due one last time (within the timeout;
        what fails is logged and lost)."""
        await self._flusher.close()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self.flush()
        except Exception as exc:
            log.warning("usage ledger: the last flush failed, %d records lost: %r", len(self), exc)

    async def flush(self) -> None:
        """Writes what is due: one unit of work per tenant (row-level security scopes each).
        Through an outage (or a cancellation) what was not written is kept for the next flush;
        a tenant whose records cannot be written otherwise (erased meanwhile) loses them."""
        due, self._due = self._due, {}
        tenants: dict[uuid.UUID, list[tuple[_Key, tuple[Decimal, Decimal]]]] = {}
        for key, sums in due.items():
            tenants.setdefault(key[0], []).append((key, sums))
        pending = list(tenants.items())
        try:
            while pending:
                tenant_id, entries = pending[0]
                try:
                    await self._write(tenant_id, entries)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    log.warning(
                        "usage ledger: %d records of tenant %s dropped: %r",
                        len(entries),
                        tenant_id,
                        exc,
                    )
                pending.pop(0)
        finally:
            for _, entries in pending:  # kept, added to what came in meanwhile
                for key, (amount, cost) in entries:
                    was = self._due.get(key, (Decimal(0), Decimal(0)))
                    self._due[key] = (was[0] + amount, was[1] + cost)

    def __len__(self) -> int:
        """How many records are due (one per tenant, user, resource, subject, version)."""
        return len(self._due)

    async def _write(
        self, tenant_id: uuid.UUID, entries: list[tuple[_Key, tuple[Decimal, Decimal]]]
    ) -> None:
        async with self._db.session(tenant_id) as session:
            for (_, user_id, resource, subject, *served), (amount, cost) in entries:
                model, version, kind = served
                add_usage(
                    session,
                    tenant_id=tenant_id,
                    user_id=user_id,
                    resource=resource,
                    subject=subject,
                    parts=[UsagePart(model, version, kind, amount, cost)],
                )


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
