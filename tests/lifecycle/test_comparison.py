"""`modelComparison`: live and candidates side by side, from the real Redis figures; through
GraphQL for operators and tenant admins only, with typed errors."""

from __future__ import annotations

from typing import Any

import pytest
from httpx import AsyncClient

from backend.errors import NotFound, ValidationFailed
from backend.lifecycle._series import Series
from backend.lifecycle.comparison import ModelComparisons, Role
from backend.lifecycle.policy import Arm, CanaryGuard, TrafficPolicy
from backend.lifecycle.shadow import ShadowLedger
from backend.lifecycle.stats import ServingStats
from backend.services import Services
from tests.accounts import Account
from tests.auth.test_graphql_auth import code, gql

POLICY = TrafficPolicy(
    model="ocr",
    arms=(Arm("tesseract-5", 90), Arm("rapidocr-3", 10)),
    shadow="rapidocr-4",
    shadow_rate=0.2,
    canary=CanaryGuard(),
)


class Policies:
    def __init__(self, *policies: TrafficPolicy) -> None:
        self.held = {p.model: p for p in policies}

    def policy(self, model: str) -> TrafficPolicy | None:
        return self.held.get(model)

    def policies(self) -> list[TrafficPolicy]:
        return list(self.held.values())

    async def rollback(self, model: str, reason: str) -> None:
        raise AssertionError("no canary breaks its guard here")


@pytest.fixture
async def comparisons(
    stats: ServingStats, ledger: ShadowLedger, series: Series
) -> ModelComparisons:
    for _ in range(90):
        stats.record("ocr", "tesseract-5", ok=True, latency_s=0.02, compute_s=0.02, cost=0.001)
    for i in range(10):
        stats.record("ocr", "rapidocr-3", ok=i != 0, latency_s=0.5, compute_s=0.5, cost=0.01)
    for cer in (0.0, 0.1):
        stats.record("ocr", "rapidocr-4", ok=True, latency_s=0.4, compute_s=0.4)
        ledger.compared(
            "ocr",
            "tesseract-5",
            "rapidocr-4",
            {"cer": cer},
            live_latency_s=0.02,
            shadow_latency_s=0.4,
        )
    ledger.failed("ocr", "tesseract-5", "rapidocr-4")
    await series.flush()
    return ModelComparisons(stats, ledger, Policies(POLICY), max_window_s=series.retention_s)


async def test_live_and_candidates_side_by_side(comparisons: ModelComparisons) -> None:
    found = await comparisons.compare("ocr", 300)
    assert (found.model, found.window_s, found.shadow_rate) == ("ocr", 300, 0.2)
    live, canary, shadow = found.versions
    assert (live.role, live.window.version, live.weight) == (Role.LIVE, "tesseract-5", 90)
    assert (live.window.requests, live.window.errors) == (90, 0)
    assert live.window.cost == pytest.approx(0.09)
    assert (canary.role, canary.window.requests, canary.window.errors) == (Role.CANDIDATE, 10, 1)
    assert canary.window.p95_s > live.window.p95_s  # type: ignore[operator]
    assert (shadow.role, shadow.weight, shadow.window.requests) == (Role.SHADOW, 0.0, 2)
    assert live.agreement is None
    assert canary.agreement is None
    assert shadow.agreement is not None
    assert (shadow.agreement.compared, shadow.agreement.failed) == (2, 1)
    assert shadow.agreement.metrics == {"cer": pytest.approx(0.05)}


async def test_unknown_models_and_bad_windows_are_typed(comparisons: ModelComparisons) -> None:
    with pytest.raises(NotFound):
        await comparisons.compare("nope", 60)
    for window in (0, -5, 10**9):
        with pytest.raises(ValidationFailed):
            await comparisons.compare("ocr", window)


QUERY = """query($model: String!, $window: Float) {
  modelComparison(model: $model, window: $window) {
  model windowSeconds shadowRate
  versions { version role weight requests errors errorRate p50Ms p95Ms tokens computeSeconds cost
    shadowAgreement { liveVersion compared failed skipped metrics { name mean }
      liveLatencyMs shadowLatencyMs } } } }"""


async def test_admins_read_the_comparison_over_graphql(
    client: AsyncClient,
    services: Services,
    comparisons: ModelComparisons,  # the figures, recorded on the test's Redis prefix
    owner: Account,
    member: Account,
) -> None:
    body = await gql(client, QUERY, owner.headers, model="ocr")
    assert code(body) == "SERVICE_UNAVAILABLE"  # no registry on this app
    assert services.lifecycle is not None
    services.lifecycle.use_registry(Policies(POLICY), Policies().rollback)
    assert code(await gql(client, QUERY, member.headers, model="ocr")) == "FORBIDDEN"
    assert code(await gql(client, QUERY, None, model="ocr")) == "UNAUTHENTICATED"
    assert code(await gql(client, QUERY, owner.headers, model="nope")) == "NOT_FOUND"
    assert code(await gql(client, QUERY, owner.headers, model="ocr", window=0)) == (
        "BAD_USER_INPUT"
    )

    data: dict[str, Any] = (await gql(client, QUERY, owner.headers, model="ocr", window=60))[
        "data"
    ]["modelComparison"]
    assert (data["model"], data["windowSeconds"], data["shadowRate"]) == ("ocr", 60, 0.2)
    live, canary, shadow = data["versions"]
    assert (live["version"], live["role"], live["requests"], live["errors"]) == (
        "tesseract-5",
        "LIVE",
        90,
        0,
    )
    assert live["shadowAgreement"] is None
    assert live["p95Ms"] == pytest.approx(20, rel=0.25)
    assert (canary["role"], canary["errorRate"]) == ("CANDIDATE", pytest.approx(0.1))
    assert canary["computeSeconds"] == pytest.approx(5.0)
    assert shadow["role"] == "SHADOW"
    assert shadow["shadowAgreement"] == {
        "liveVersion": "tesseract-5",
        "compared": 2,
        "failed": 1,
        "skipped": 0,
        "metrics": [{"name": "cer", "mean": pytest.approx(0.05)}],
        "liveLatencyMs": pytest.approx(20),
        "shadowLatencyMs": pytest.approx(400),
    }
