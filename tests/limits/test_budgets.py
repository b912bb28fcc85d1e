"""Budgets: reserve, charge mid-stream, settle; atomic across concurrent runs."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
from redis.asyncio import Redis
from sqlalchemy import select

from backend.config import BudgetSpec, LimitsSettings
from backend.core.db import Database
from backend.core.models import Tenant, UsageRecord
from backend.core.redis import KeySpace
from backend.limits.budgets import BudgetExceeded, Budgets, Resource
from backend.limits.usage import usage_by_day


def _budgets(redis: Redis, prefix: str, **spec: float) -> Budgets:
    settings = LimitsSettings(budgets={"free": {"llm_tokens": BudgetSpec(**spec)}})
    return Budgets(redis, KeySpace(prefix), settings)


async def test_reserve_charge_settle(redis: Redis, key_prefix: str, db: Database) -> None:
    async with db.session() as session:
        tenant = Tenant(slug=f"b-{uuid.uuid4().hex[:8]}", name="B")
        session.add(tenant)
    budgets = _budgets(redis, key_prefix, tenant_day=100)
    run = await budgets.reserve(
        tenant_id=tenant.id,
        user_id=None,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=60,
        subject="run-1",
    )
    # The hold counts against others: 60 held + 50 asked > 100.
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(
            tenant_id=tenant.id,
            user_id=None,
            plan="free",
            resource=Resource.LLM_TOKENS,
            amount=50,
            subject="run-2",
        )
    assert refused.value.extensions["available"] == 40
    assert refused.value.extensions["scope"] == "tenant per day"

    assert await run.charge(30) == 70
    async with db.session(tenant.id) as session:
        await run.settle(session, cost_per_unit=Decimal("0.001"))
    # Only what was used stays counted: 30 used, the other 30 of the hold released.
    second = await budgets.reserve(
        tenant_id=tenant.id,
        user_id=None,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=70,
        subject="run-3",
    )
    assert second.held == 70
    async with db.session(tenant.id) as session:
        record = await session.scalar(select(UsageRecord).where(UsageRecord.subject == "run-1"))
        assert record is not None
        assert record.amount == 30
        assert record.cost == Decimal("0.03")
        days = await usage_by_day(session, 1)
    assert [(d.resource, float(d.amount)) for d in days] == [("llm_tokens", 30.0)]


async def test_a_run_that_exhausts_its_budget_mid_stream_stops(
    redis: Redis, key_prefix: str
) -> None:
    budgets = _budgets(redis, key_prefix, user_day=10)
    user = uuid.uuid4()
    run = await budgets.reserve(
        tenant_id=uuid.uuid4(),
        user_id=user,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=4,
        subject="r",
    )
    assert await run.charge(4) == 6
    assert await run.charge(5) == 1
    with pytest.raises(BudgetExceeded, match="user per day"):
        await run.charge(1)


async def test_concurrent_reservations_never_overspend(redis: Redis, key_prefix: str) -> None:
    budgets = _budgets(redis, key_prefix, tenant_month=100)
    tenant = uuid.uuid4()

    async def attempt() -> bool:
        try:
            await budgets.reserve(
                tenant_id=tenant,
                user_id=None,
                plan="free",
                resource=Resource.LLM_TOKENS,
                amount=7,
                subject="r",
            )
        except BudgetExceeded:
            return False
        return True

    results = await asyncio.gather(*(attempt() for _ in range(50)))
    assert sum(results) == 14  # floor(100 / 7), however the 50 requests interleave


async def _held_and_used(redis: Redis, budgets: Budgets, tenant: uuid.UUID) -> tuple[float, float]:
    keys = budgets._counter_keys(tenant, None, Resource.LLM_TOKENS)
    used, held = await redis.get(keys[0]), await redis.get(keys[4])
    return float(held or 0), float(used or 0)


async def test_a_dead_replicas_reservation_is_recovered_and_settled_once(
    redis: Redis, key_prefix: str, db: Database
) -> None:
    """The replica holding a run's reservation died: the one that recovers the run finds the
    reservation in Redis, gives back what was held and not used, and records the usage once."""
    async with db.session() as session:
        tenant = Tenant(slug=f"b-{uuid.uuid4().hex[:8]}", name="B")
        session.add(tenant)
    budgets = _budgets(redis, key_prefix, tenant_day=1000)
    lost = await budgets.reserve(
        tenant_id=tenant.id,
        user_id=None,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=512,
        subject="run:lost",
        hold_id="lost",
    )
    await lost.charge(16)
    await lost.charge(16)
    assert await _held_and_used(redis, budgets, tenant.id) == (480, 32)
    del lost  # the replica died: only Redis remembers

    recovered = await budgets.recover(
        tenant_id=tenant.id, user_id=None, resource=Resource.LLM_TOKENS, hold_id="lost"
    )
    assert recovered is not None
    assert (recovered.held, recovered.charged, recovered.subject) == (512, 32, "run:lost")
    await recovered.charge(3)  # delivered before the crash, not charged yet
    async with db.session(tenant.id) as session:
        await recovered.settle(session)
    assert await _held_and_used(redis, budgets, tenant.id) == (0, 35)

    again = await budgets.recover(
        tenant_id=tenant.id, user_id=None, resource=Resource.LLM_TOKENS, hold_id="lost"
    )
    assert again is None  # settled: a second recovery finds nothing to give back
    async with db.session(tenant.id) as session:
        amounts = list(
            await session.scalars(
                select(UsageRecord.amount).where(UsageRecord.subject == "run:lost")
            )
        )
    assert amounts == [35]


async def test_a_charge_repeated_after_a_lost_reply_counts_once(
    redis: Redis, key_prefix: str
) -> None:
    budgets = _budgets(redis, key_prefix, tenant_day=1000)
    tenant = uuid.uuid4()
    run = await budgets.reserve(
        tenant_id=tenant,
        user_id=None,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=100,
        subject="r",
        hold_id="r",
    )
    await run.charge(16)
    run.charged -= 16  # as if the reply had been lost: the caller sends the same charge again
    await run.charge(16)
    assert await _held_and_used(redis, budgets, tenant) == (84, 16)
    assert await run.release()
    assert not await run.release()
    assert await _held_and_used(redis, budgets, tenant) == (0, 16)


@pytest.mark.parametrize("hold_id", [None, "closed"])
async def test_close_charges_what_is_owed_gives_back_the_rest_and_settle_records_it(
    redis: Redis, key_prefix: str, db: Database, hold_id: str | None
) -> None:
    """The end of a run in one round trip: the tokens owed charged, the hold's rest given
    back (recorded reservation or not); `settle` then records the usage once."""
    async with db.session() as session:
        tenant = Tenant(slug=f"c-{uuid.uuid4().hex[:8]}", name="C")
        session.add(tenant)
    budgets = _budgets(redis, key_prefix, tenant_day=1000)
    run = await budgets.reserve(
        tenant_id=tenant.id,
        user_id=None,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=100,
        subject="closed",
        hold_id=hold_id,
    )
    await run.charge(10)
    await budgets.close([(run, 25)])
    assert run.settled
    assert run.charged == 35
    assert await _held_and_used(redis, budgets, tenant.id) == (0, 35)
    await budgets.close([(run, 5)])  # settled: nothing more is charged or given back
    assert await _held_and_used(redis, budgets, tenant.id) == (0, 35)
    async with db.session(tenant.id) as session:
        await run.settle(session)
    async with db.session(tenant.id) as session:
        amounts = list(
            await session.scalars(select(UsageRecord.amount).where(UsageRecord.subject == "closed"))
        )
    assert amounts == [35]


async def test_close_past_the_budget_charges_all_and_raises_nothing(
    redis: Redis, key_prefix: str
) -> None:
    budgets = _budgets(redis, key_prefix, tenant_day=50)
    tenant = uuid.uuid4()
    run = await budgets.reserve(
        tenant_id=tenant,
        user_id=None,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=40,
        subject="r",
    )
    await budgets.close([(run, 60)])  # the work is over: what it used counts
    assert await _held_and_used(redis, budgets, tenant) == (0, 60)
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(
            tenant_id=tenant,
            user_id=None,
            plan="free",
            resource=Resource.LLM_TOKENS,
            amount=1,
            subject="next",
        )


async def test_admit_and_reserve_refused_holds_nothing(redis: Redis, key_prefix: str) -> None:
    budgets = _budgets(redis, key_prefix, tenant_day=50)
    tenant = uuid.uuid4()
    asked = {"tenant_id": tenant, "user_id": None, "plan": "free", "subject": "r"}
    money, tokens = await budgets.admit_and_reserve(
        resource=Resource.LLM_TOKENS, amount=30, **asked
    )
    assert (money.resource, money.held, tokens.held) == (Resource.COST, 0, 30)
    with pytest.raises(BudgetExceeded, match="cannot cover 30"):
        await budgets.admit_and_reserve(resource=Resource.LLM_TOKENS, amount=30, **asked)
    assert await _held_and_used(redis, budgets, tenant) == (30, 0)
