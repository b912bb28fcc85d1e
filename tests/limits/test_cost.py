"""Money as a budget unit and usage per model version: prices per compute-second, the money
budget charged with tokens in one round trip, usage rows by model, and the cost metrics."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis
from sqlalchemy import select

from backend.config import BudgetSpec, CostSettings, LimitsSettings, Settings
from backend.core.db import Database
from backend.core.metrics import Metrics
from backend.core.models import Tenant, UsageRecord
from backend.core.redis import KeySpace
from backend.errors import ServiceUnavailable
from backend.inference.manifest import ManifestError, ModelManifest
from backend.lifecycle.schemas import EmbeddingSpec
from backend.limits.budgets import BudgetExceeded, Budgets, Resource, UsagePart
from backend.limits.pricing import ComputePricing, compute_cost, compute_price, device_of
from backend.limits.usage import UsageLedger, usage_by_day

PRICES = {"cpu": 0.5, "cuda": 2.0}


def test_a_versions_own_price_wins_over_the_settings() -> None:
    assert compute_price(None, PRICES, "cpu") == Decimal("0.5")
    assert compute_price({"cuda": 3.0}, PRICES, "cuda:1") == Decimal("3.0")
    assert compute_price({"cuda": 3.0}, PRICES, "cpu") == Decimal("0.5")  # not its kind
    assert compute_price(None, PRICES, "remote") == Decimal(0)  # a kind nobody priced: free
    assert compute_cost(1.5, Decimal("0.5")) == Decimal("0.75")
    assert device_of("cuda:0") == "cuda"
    assert device_of("cpu") == "cpu"
    assert CostSettings().compute_second_prices["cpu"] > 0


def test_prices_in_manifests_and_specs_are_checked() -> None:
    manifest = {"name": "m", "version": "1", "task": "classification", "runtime": "python"}
    manifest["loader"] = "x:y"
    assert ModelManifest.from_dict(
        {**manifest, "compute_second_prices": {"cpu": 0.25}}
    ).compute_second_prices == {"cpu": 0.25}
    with pytest.raises(ManifestError, match="price"):
        ModelManifest.from_dict({**manifest, "compute_second_prices": {"cpu": -1}})
    assert EmbeddingSpec(compute_second_prices={"remote": 0.1}).compute_second_prices
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        EmbeddingSpec(compute_second_prices={"cpu": -0.1})
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        CostSettings(compute_second_prices={"cpu": -0.1})


def test_what_compute_costs_is_counted_per_tenant_model_version_and_device() -> None:
    metrics = Metrics()
    pricing = ComputePricing(PRICES, metrics)
    tenant = uuid.uuid4()
    assert pricing.spent(tenant, "clf", "2", "vision", 2.0, "cuda:0") == Decimal("4.0")
    assert pricing.spent(tenant, "emb", "1", "embedding", 1.0, "cpu", {"cpu": 0.1}) == Decimal(
        "0.1"
    )
    text = generate_latest(metrics.registry).decode()
    assert (
        f'sightline_model_cost_total{{kind="vision",model="clf",tenant="{tenant}",version="2"}} '
        "4.0" in text
    )
    assert (
        'sightline_model_compute_seconds_total{device="cuda",kind="vision",model="clf",'
        'version="2"} 2.0' in text
    )
    assert (
        'sightline_model_compute_seconds_total{device="cpu",kind="embedding",model="emb",'
        'version="1"} 1.0' in text
    )


def _budgets(redis: Redis, prefix: str, metrics: Metrics | None = None, **cost: float) -> Budgets:
    settings = LimitsSettings(
        budgets={"free": {"cost": BudgetSpec(**cost), "llm_tokens": BudgetSpec(user_day=1000)}}
    )
    return Budgets(redis, KeySpace(prefix), settings, metrics)


async def test_money_is_a_budget_charged_with_tokens_in_one_round_trip(
    redis: Redis, key_prefix: str
) -> None:
    metrics = Metrics()
    budgets = _budgets(redis, key_prefix, metrics, user_day=1.0)
    tenant, user = uuid.uuid4(), uuid.uuid4()
    ask = {"tenant_id": tenant, "user_id": user, "plan": "free"}
    tokens = await budgets.reserve(**ask, resource=Resource.LLM_TOKENS, amount=100, subject="r")
    money = await budgets.admit(**ask, subject="r")
    assert money.held == 0
    await budgets.charge_with_money(tokens, money, 16, 0.4)
    assert (tokens.charged, money.charged) == (16, 0.4)
    text = generate_latest(metrics.registry).decode()
    assert (
        f'sightline_budget_remaining_ratio{{resource="cost",scope="user_day",tenant="{tenant}"}} '
        "0.6" in text
    )
    with pytest.raises(BudgetExceeded) as spent:  # both are charged, then the money refuses
        await budgets.charge_together([(tokens, 16), (money, 0.6)])
    assert spent.value.extensions["resource"] == "cost"
    assert tokens.charged == 32
    # spent: the next run is refused before it starts, though it holds nothing
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.admit(**ask, subject="r2")
    assert refused.value.code == "BUDGET_EXCEEDED"
    assert refused.value.extensions["scope"] == "user per day"
    # another user of the tenant still has theirs
    other = {**ask, "user_id": uuid.uuid4()}
    await budgets.admit(**other, subject="r3")
    # a charge without a reservation (a search's query embedding) refuses once used up
    search = {**other, "resource": Resource.COST, "amount": 0.5, "subject": "embedding"}
    assert await budgets.charge(**search) == 0.5
    with pytest.raises(BudgetExceeded):
        await budgets.charge(**search)


async def test_usage_rows_by_model_version_and_kind(
    redis: Redis, key_prefix: str, db: Database
) -> None:
    async with db.session() as session:
        tenant = Tenant(slug=f"c-{uuid.uuid4().hex[:8]}", name="C")
        session.add(tenant)
    budgets = _budgets(redis, key_prefix)
    ask = {"tenant_id": tenant.id, "user_id": None, "plan": "free"}
    run = await budgets.reserve(**ask, resource=Resource.LLM_TOKENS, amount=50, subject="run")
    await run.charge(40)
    job = await budgets.reserve(**ask, resource=Resource.COMPUTE_SECONDS, amount=5, subject="v")
    await job.charge(3)
    async with db.session(tenant.id) as session:
        await run.settle(session, cost=Decimal("0.04"), served_by=("default", "2", "chat"))
        await job.settle(
            session,
            parts=[
                UsagePart("clf", "1", "vision", Decimal(1), Decimal("0.5")),
                UsagePart("det", "3", "vision", Decimal(2), Decimal("1.0")),
            ],
        )
        by_model = await usage_by_day(session, 1, by_model=True)
        whole = await usage_by_day(session, 1)
    assert [
        (d.resource, d.model, d.version, d.kind, float(d.amount), float(d.cost)) for d in by_model
    ] == [
        ("compute_seconds", "clf", "1", "vision", 1.0, 0.5),
        ("compute_seconds", "det", "3", "vision", 2.0, 1.0),
        ("llm_tokens", "default", "2", "chat", 40.0, 0.04),
    ]
    assert [(d.resource, float(d.amount), float(d.cost), d.model) for d in whole] == [
        ("compute_seconds", 3.0, 1.5, None),
        ("llm_tokens", 40.0, 0.04, None),
    ]


async def test_the_ledger_writes_sums_per_flush_and_keeps_what_an_outage_did_not(
    db: Database, settings: Settings
) -> None:
    """Calls of one tenant, user and model version between two flushes are one record; a
    tenant whose records cannot be written (here: it does not exist) loses them without
    holding up the others; through an outage they are kept; closing writes what is left."""
    async with db.session() as session:
        first = Tenant(slug=f"l-{uuid.uuid4().hex[:8]}", name="L")
        session.add(first)
    ledger = UsageLedger(db, flush_s=3600, timeout_s=30)
    part = UsagePart("minilm", "1", "embedding", Decimal("0.25"), Decimal("0.5"))
    usage = {"user_id": None, "resource": "compute_seconds", "subject": "s", "part": part}
    for tenant_id in (uuid.uuid4(), first.id, first.id):
        ledger.add(tenant_id=tenant_id, **usage)
    await ledger.flush()
    assert len(ledger) == 0
    ledger.add(tenant_id=first.id, **usage)
    await ledger.close()

    down = Database.connect("postgresql+asyncpg://sightline@127.0.0.1:9/none", settings.database)
    try:
        outage = UsageLedger(down, flush_s=3600, timeout_s=30)
        outage.add(tenant_id=first.id, **usage)
        with pytest.raises(ServiceUnavailable):
            await outage.flush()
        assert len(outage) == 1  # kept for the next flush
    finally:
        await down.dispose()

    async with db.session(first.id) as session:
        rows = await session.scalars(select(UsageRecord).order_by(UsageRecord.amount.desc()))
        records = [(r.amount, r.cost, r.kind) for r in rows]
    assert records == [
        (Decimal("0.5"), Decimal("1.0"), "embedding"),  # the first flush: two calls summed
        (Decimal("0.25"), Decimal("0.5"), "embedding"),  # the last one, written by close
    ]


async def test_a_recorded_money_charge_retried_after_a_lost_reply_counts_once(
    redis: Redis, key_prefix: str
) -> None:
    """A vision job's money is admitted under its key: the charge at its end names its total,
    so the same charge sent again (its first reply lost) adds nothing, and the replica that
    recovers the reservation sees what was charged."""
    budgets = _budgets(redis, key_prefix)
    tenant_id = uuid.uuid4()
    ask = {"tenant_id": tenant_id, "user_id": None, "plan": "free", "subject": "vision"}
    money = await budgets.admit(**ask, hold_id="job-1")
    keys, args = money._charge_call(0.25)
    await budgets._charge(keys=keys, args=args)  # it counted; its reply never came back
    await budgets.charge_together([(money, 0.25)])  # so the job sends it again
    [tenant_day, *_] = budgets._counter_keys(tenant_id, None, Resource.COST)
    assert float(await redis.get(tenant_day)) == pytest.approx(0.25)
    recovered = await budgets.recover(
        tenant_id=tenant_id, user_id=None, resource=Resource.COST, hold_id="job-1"
    )
    assert recovered is not None
    assert recovered.charged == pytest.approx(0.25)
    assert await recovered.release()
    assert (
        await budgets.recover(
            tenant_id=tenant_id, user_id=None, resource=Resource.COST, hold_id="job-1"
        )
        is None
    )
