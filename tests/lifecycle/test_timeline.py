"""`operationsTimeline`: per-step figures of each version from the real Redis buckets, typed
errors by code over the same steps, version events from the registry's policy revisions;
bounded, validated, and for admins only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from httpx import AsyncClient
from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.metrics import Metrics
from backend.core.models import TrafficPolicyRevision
from backend.core.redis import KeySpace
from backend.errors import ValidationFailed
from backend.lifecycle._series import Series
from backend.lifecycle.policy import (
    Arm,
    CanaryGuard,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    TrafficPolicy,
    VersionStatus,
)
from backend.lifecycle.service import ModelRegistryService
from backend.lifecycle.stats import ErrorCounts, ServingStats
from backend.lifecycle.timeline import OperationsTimelines, VersionEvent, events_of
from backend.services import Services
from tests.accounts import Account
from tests.auth.test_graphql_auth import code, gql
from tests.lifecycle.conftest import People, chat_model
from tests.lifecycle.test_stats import Clock

NOW = 1_000_045.0  # buckets of 10 s; steps of 20 s start at ..., 1_000_000, 1_000_020, 1_000_040


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
async def clocked(redis: Redis, key_prefix: str, clock: Clock) -> Series:
    series = Series(redis, KeySpace(key_prefix), LifecycleSettings(), clock=clock)
    yield series  # type: ignore[misc]
    await series.close()


async def test_each_step_sums_its_buckets_on_every_replica(clocked: Series, clock: Clock) -> None:
    stats = ServingStats(clocked)
    clock.now = 1_000_001  # bucket 1_000_000, step 1_000_000
    for _ in range(4):
        stats.record("ocr", "1", ok=True, latency_s=0.010, cost=0.5)
    clock.now = 1_000_035  # bucket 1_000_030, step 1_000_020
    stats.record("ocr", "1", ok=False, latency_s=1.0, compute_s=2.0)
    await clocked.flush()
    clock.now = NOW  # not flushed yet: this replica still counts it
    stats.record("ocr", "1", ok=True, latency_s=0.1, tokens=7)

    steps = await stats.timeline("ocr", "1", 60, 20)
    assert [start for start, _ in steps] == [999_980, 1_000_000, 1_000_020, 1_000_040]
    empty, first, second, third = (w for _, w in steps)
    assert (empty.requests, empty.p95_s) == (0, None)
    assert (first.requests, first.errors, first.cost) == (4, 0, 2.0)
    assert first.p50_s == pytest.approx(0.010, rel=0.25)
    assert (second.requests, second.errors, second.compute_s) == (1, 1, 2.0)
    assert (third.requests, third.tokens) == (1, 7)
    # the sums over the window are the same figures
    window = await stats.window("ocr", "1", 60)
    assert (window.requests, window.errors) == (6, 1)


async def test_errors_are_counted_by_code_per_step(clocked: Series, clock: Clock) -> None:
    errors = ErrorCounts(clocked)
    clock.now = 1_000_001
    errors.record("NOT_FOUND")
    errors.record("NOT_FOUND")
    await clocked.flush()
    clock.now = NOW
    errors.record("FORBIDDEN")
    found = await errors.timeline(60, 20)
    assert found == {
        "FORBIDDEN": [(999_980, 0), (1_000_000, 0), (1_000_020, 0), (1_000_040, 1)],
        "NOT_FOUND": [(999_980, 0), (1_000_000, 2), (1_000_020, 0), (1_000_040, 0)],
    }


def test_the_metrics_hand_each_typed_error_to_the_timeline() -> None:
    metrics = Metrics(max_error_codes=1)
    seen: list[str] = []
    metrics.on_error = seen.append
    metrics.error("graphql", "NOT_FOUND", "anonymous")
    metrics.error("graphql", "FORBIDDEN", "anonymous")  # past max_error_codes: OTHER
    metrics.error("graphql", "lower case", "anonymous")
    assert seen == ["NOT_FOUND", "OTHER", "OTHER"]


def _revision(
    revision: int, action: str, arms: dict[str, float], **fields: Any
) -> TrafficPolicyRevision:
    return TrafficPolicyRevision(
        model="ocr",
        revision=revision,
        action=action,
        arms=[{"version": v, "weight": w} for v, w in arms.items()],
        created_at=datetime(2026, 11, 30, 3, revision, tzinfo=UTC),
        **fields,
    )


def test_policy_revisions_become_version_events() -> None:
    seed = _revision(1, "seed", {"1": 100})
    shadow = _revision(2, "set", {"1": 100}, shadow="2", shadow_rate=0.2)
    canary = _revision(3, "set", {"1": 90, "2": 10}, canary={"min_requests": 50})
    ramp = _revision(4, "set", {"1": 50, "2": 50}, reason="canary guard: ramp", canary={})
    back = _revision(5, "rollback", {"1": 100}, reason="canary guard: error_rate")
    promote = _revision(6, "promote", {"2": 100})
    weights = _revision(7, "set", {"2": 80, "3": 20})
    undo = _revision(8, "rollback", {"2": 100}, reason="by hand")
    changes = [
        (seed, None),
        (shadow, seed),
        (canary, shadow),
        (ramp, canary),
        (back, ramp),
        (promote, back),
        (weights, promote),
        (undo, weights),
    ]
    assert [(e.version, e.event) for e in events_of(changes)] == [
        ("1", "seed"),
        ("2", "shadow"),
        ("2", "canary"),
        ("2", "canary_ramp"),
        ("2", "canary_rollback"),
        ("2", "promote"),
        ("3", "traffic"),
        ("3", "rollback"),
    ]
    assert events_of([(seed, None)])[0].at == seed.created_at


async def test_the_registry_reads_its_version_events(
    registry: ModelRegistryService, people: People
) -> None:
    await chat_model(registry, "scribe", "1", "2")
    await registry.set_traffic_policy(people.operator, "scribe", [Arm("1", 100)])
    await registry.set_traffic_policy(
        people.operator, "scribe", [Arm("1", 90), Arm("2", 10)], canary=CanaryGuard()
    )
    await registry.rollback_model(None, "scribe", reason="canary guard: p95_latency")
    await registry.promote_version(people.operator, "scribe", "2")
    since = datetime.now(UTC) - timedelta(hours=1)
    found = [(e.model, e.version, e.event) for e in await registry.version_events(since, 100)]
    scribe = [e for e in found if e[0] == "scribe"]
    assert scribe[-3:] == [
        ("scribe", "2", "canary"),
        ("scribe", "2", "canary_rollback"),
        ("scribe", "2", "promote"),
    ]
    assert len(await registry.version_events(since, 2)) == 2  # the newest within the bound
    assert await registry.version_events(datetime.now(UTC) + timedelta(hours=1), 100) == []


def _snapshot() -> RegistrySnapshot:
    def record(version: str, status: VersionStatus) -> ModelVersionRecord:
        return ModelVersionRecord("ocr", version, ModelKind.VISION, "ocr", status)

    return RegistrySnapshot(
        versions={
            "ocr": (
                record("1", VersionStatus.LIVE),
                record("2", VersionStatus.CANARY),
                record("0", VersionStatus.READY),  # out of the policy: shown while it serves
                record("9", VersionStatus.RETIRED),
            )
        },
        policies={"ocr": TrafficPolicy("ocr", (Arm("1", 90), Arm("2", 10)))},
    )


async def _history(since: datetime, limit: int) -> list[VersionEvent]:
    return [VersionEvent(datetime.now(UTC), "ocr", "2", "canary")][:limit]


@pytest.fixture
def timelines(clocked: Series) -> OperationsTimelines:
    return OperationsTimelines(
        ServingStats(clocked),
        ErrorCounts(clocked),
        _snapshot,
        _history,
        bucket_s=10,
        max_window_s=3600,
        max_points=100,
        max_events=10,
    )


async def test_bad_windows_and_steps_are_refused(timelines: OperationsTimelines) -> None:
    for window, step in (
        (0, 10),
        (-60, 10),
        (7200, 60),  # past the retention
        (600, 0),
        (600, 15),  # not a multiple of the buckets
        (60, 120),  # a step past the window
        (3600, 10),  # 360 points
    ):
        with pytest.raises(ValidationFailed):
            await timelines.read(window, step)


async def test_the_versions_of_the_registry_and_those_that_served(
    timelines: OperationsTimelines, clocked: Series
) -> None:
    found = await timelines.read(60, 20)
    assert [(m.version, m.status, m.kind) for m in found.models] == [
        ("1", "live", "vision"),
        ("2", "canary", "vision"),
    ]
    assert all(len(m.points) == 4 for m in found.models)
    ServingStats(clocked).record("ocr", "0", ok=True, latency_s=0.1)
    found = await timelines.read(60, 20)
    assert [m.version for m in found.models] == ["1", "2", "0"]
    assert [e.event for e in found.events] == ["canary"]


QUERY = """query($window: Int!, $step: Int!) { operationsTimeline(window: $window, step: $step) {
  window step
  models { model version kind status points { at requests errors p50Ms p95Ms tokens
    computeSeconds cost } }
  errors { code points { at count } }
  versionEvents { at model version event } } }"""


async def test_admins_read_the_timeline_over_graphql(
    client: AsyncClient,
    services: Services,
    owner: Account,
    member: Account,
    lifecycle_settings: LifecycleSettings,
) -> None:
    assert services.lifecycle is not None
    services.lifecycle.use_history(_snapshot, _history)
    services.lifecycle.stats.record("ocr", "1", ok=True, latency_s=0.02, compute_s=0.02)
    assert code(await gql(client, QUERY, member.headers, window=600, step=60)) == "FORBIDDEN"
    assert code(await gql(client, QUERY, None, window=600, step=60)) == "UNAUTHENTICATED"
    bad = await gql(client, QUERY, owner.headers, window=600, step=15)
    assert code(bad) == "BAD_USER_INPUT"

    body = await gql(client, QUERY, owner.headers, window=600, step=60)
    data = body["data"]["operationsTimeline"]
    assert (data["window"], data["step"]) == (600, 60)
    live = data["models"][0]
    assert (live["model"], live["version"], live["status"]) == ("ocr", "1", "live")
    assert len(live["points"]) in (10, 11)  # the current step, partly over, is the last
    assert sum(p["requests"] for p in live["points"]) == 1
    served = next(p for p in live["points"] if p["requests"])
    assert served["p95Ms"] == pytest.approx(20, rel=0.25)
    # the refusals above were counted by code, as sightline_errors_total counts them
    errors = {e["code"]: sum(p["count"] for p in e["points"]) for e in data["errors"]}
    assert errors["FORBIDDEN"] >= 1
    assert errors["BAD_USER_INPUT"] >= 1
    assert data["versionEvents"][0]["event"] == "canary"
