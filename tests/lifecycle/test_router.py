"""Routing a request to a version: precedence, stickiness across replicas and restarts, weights,
and the fallback of a replica that has not loaded a version yet."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest

from backend.lifecycle.policy import (
    Arm,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    RequestKey,
    RouteReason,
    StickyKey,
    TrafficPolicy,
    VersionStatus,
)
from backend.lifecycle.router import ModelRouter, UnknownVersion

MODEL = "classifier"


def record(version: str, status: VersionStatus = VersionStatus.READY) -> ModelVersionRecord:
    return ModelVersionRecord(MODEL, version, ModelKind.VISION, "classification", status)


def snapshot(
    arms: Iterable[tuple[str, float]],
    *,
    revision: int = 1,
    sticky: StickyKey = StickyKey.USER,
    pins: dict[tuple[str, str], str] | None = None,
    shadow: str | None = None,
    shadow_rate: float = 0.0,
) -> RegistrySnapshot:
    arms = tuple(Arm(v, w) for v, w in arms)
    policy = TrafficPolicy(
        MODEL, arms, sticky=sticky, shadow=shadow, shadow_rate=shadow_rate, revision=revision
    )
    versions = tuple(record(a.version, VersionStatus.LIVE) for a in arms)
    return RegistrySnapshot({MODEL: versions}, {MODEL: policy}, pins or {}, revision)


def router(ready: Iterable[str] = ("1", "2", "3"), default: str = "1") -> ModelRouter:
    here = [default, *(v for v in ready if v != default)]
    return ModelRouter(lambda model, version: model == MODEL and version in here, lambda _: here)


def key(user: str, tenant: str = "t1") -> RequestKey:
    return RequestKey(tenant_id=tenant, user_id=user, request_id=f"req-{user}")


def test_a_request_pin_beats_a_tenant_pin_which_beats_the_policy() -> None:
    routes = router()
    routes.apply(snapshot([("1", 0), ("2", 100)], pins={("t1", MODEL): "3"}))
    pinned = routes.route(MODEL, key("u"), "1")
    assert (pinned.version, pinned.reason) == ("1", RouteReason.REQUEST_PIN)
    tenant = routes.route(MODEL, key("u"))
    assert (tenant.version, tenant.reason) == ("3", RouteReason.TENANT_PIN)
    other = routes.route(MODEL, key("u", tenant="t2"))
    assert (other.version, other.reason) == ("2", RouteReason.POLICY)


def test_without_a_policy_the_local_default_serves() -> None:
    route = router(default="2").route(MODEL, key("u"))
    assert (route.version, route.reason) == ("2", RouteReason.DEFAULT)


def test_a_pin_to_an_unknown_or_unloaded_version_names_those_there_are() -> None:
    routes = router(ready=("1", "2"))
    routes.apply(snapshot([("1", 100)]))
    with pytest.raises(UnknownVersion) as refused:
        routes.route(MODEL, key("u"), "3")
    assert refused.value.code == "BAD_USER_INPUT"
    assert refused.value.details["available"] == ["1", "2"]
    assert "available: 1, 2" in refused.value.message


def test_a_user_stays_on_one_arm_across_replicas_and_restarts() -> None:
    policy = snapshot([("1", 50), ("2", 50)])
    first, second = router(), router()  # two replicas
    first.apply(policy)
    second.apply(policy)
    users = [f"user-{i}" for i in range(200)]
    chosen = {u: first.route(MODEL, key(u)).version for u in users}
    assert chosen == {u: second.route(MODEL, key(u)).version for u in users}
    assert all(first.route(MODEL, key(u)).version == chosen[u] for u in users)  # again
    restarted = router()
    restarted.apply(policy)
    assert chosen == {u: restarted.route(MODEL, key(u)).version for u in users}
    assert set(chosen.values()) == {"1", "2"}


def test_the_sticky_key_decides_what_stays_together() -> None:
    routes = router()
    routes.apply(snapshot([("1", 50), ("2", 50)], sticky=StickyKey.TENANT))
    tenants = {routes.route(MODEL, key(f"u{i}", tenant="acme")).version for i in range(50)}
    assert len(tenants) == 1  # every user of a tenant on its arm


def test_weights_split_keys_in_proportion() -> None:
    routes = router()
    routes.apply(snapshot([("1", 70), ("2", 20), ("3", 10)]))
    counts = Counter(routes.route(MODEL, key(f"user-{i}")).version for i in range(20_000))
    assert counts["1"] / 20_000 == pytest.approx(0.70, abs=0.02)
    assert counts["2"] / 20_000 == pytest.approx(0.20, abs=0.02)
    assert counts["3"] / 20_000 == pytest.approx(0.10, abs=0.02)


def test_an_arm_not_ready_here_falls_back_to_the_live_version() -> None:
    behind = router(ready=("1",))  # this replica has not loaded version 2 yet
    behind.apply(snapshot([("1", 80), ("2", 20)]))
    versions = {behind.route(MODEL, key(f"user-{i}")).version for i in range(200)}
    assert versions == {"1"}
    # the new version is live everywhere but here: the previous ready one serves
    behind.apply(snapshot([("2", 100)], revision=2))
    route = behind.route(MODEL, key("u"))
    assert (route.version, route.reason) == ("1", RouteReason.DEFAULT)
    # a tenant pinned to a version not here is served too
    behind.apply(snapshot([("1", 100)], revision=3, pins={("t1", MODEL): "2"}))
    assert behind.route(MODEL, key("u")).version == "1"


def test_the_highest_revision_wins() -> None:
    routes = router()
    assert routes.apply(snapshot([("2", 100)], revision=5))
    assert not routes.apply(snapshot([("1", 100)], revision=4))  # a late reconcile
    assert routes.route(MODEL, key("u")).version == "2"


def test_shadow_is_sampled_and_never_the_serving_arm() -> None:
    routes = router()
    routes.apply(snapshot([("1", 100)], shadow="2", shadow_rate=0.25))
    shadows = [routes.route(MODEL, key(f"user-{i}")).shadow for i in range(4000)]
    assert set(shadows) == {None, "2"}
    assert shadows.count("2") / 4000 == pytest.approx(0.25, abs=0.03)
    not_here = router(ready=("1",))
    not_here.apply(snapshot([("1", 100)], shadow="2", shadow_rate=1.0))
    assert not_here.route(MODEL, key("u")).shadow is None
