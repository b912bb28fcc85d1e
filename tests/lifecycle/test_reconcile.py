"""The pool reconciler with real worker processes: the registry adds a version (loaded, warmed,
reported ready), switches the policy to it and retires the old one, while clients classify the
whole time; a version that fails to load is reported and changes nothing; closing cancels a load."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from backend.inference.client import ModelStatus
from backend.inference.pool import InferencePool
from backend.lifecycle.policy import RegistrySnapshot, VersionStatus
from backend.lifecycle.reconcile import PoolReconciler
from backend.lifecycle.router import ModelRouter
from tests.inference.test_pool import pools
from tests.inference.test_pool_versions import MODEL, Clients, holding, policy, version

__all__ = ["pools"]  # fixture

Reports = list[tuple[str, str, str, bool, str | None]]


def reporter() -> tuple[Reports, Callable[..., Any]]:
    reports: Reports = []

    async def report(replica: str, model: str, version: str, ok: bool, error: str | None) -> None:
        reports.append((replica, model, version, ok, error))

    return reports, report


async def eventually(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):
        while not check():
            await asyncio.sleep(0.02)


async def test_the_registry_swaps_versions_under_load(pools: Callable[..., Any]) -> None:
    pool: InferencePool = await pools(version("1", seconds=0.01), workers=2)
    router = ModelRouter.over(pool)
    reports, report = reporter()
    reconciler = PoolReconciler(pool, report, replica_id="r1", drain_s=30)
    listeners = [router, reconciler]  # in the watcher's order: routing first

    async def publish(snapshot: RegistrySnapshot) -> None:
        for listener in listeners:
            await listener(snapshot)

    await publish(policy("1", revision=1))
    await eventually(lambda: ("r1", MODEL, "1", True, None) in reports)  # loaded at start
    clients = Clients(pool, router)
    await clients.until(20)

    v2 = version("2", seconds=0.01, load_s=0.5)
    await publish(policy("1", revision=2, others={"2": (VersionStatus.LOADING, v2)}))
    await eventually(lambda: ("r1", MODEL, "2", True, None) in reports)
    assert pool.versions()[(MODEL, "2")].status is ModelStatus.READY
    assert {answered for _, answered in clients.served} == {"1"}

    await publish(policy("2", "1", revision=3))  # live now; 1 retired
    await reconciler.settled()
    assert set(pool.versions()) == {(MODEL, "2")}
    assert pool.default_version(MODEL) == "2"
    await clients.until(len(clients.served) + 20)
    await clients.stop()
    await reconciler.close()
    assert clients.failures == []
    assert all(routed == answered for routed, answered in clients.served)
    assert {answered for _, answered in clients.served} == {"1", "2"}
    await holding(pool, [[f"{MODEL}@2"], [f"{MODEL}@2"]])


async def test_a_version_that_fails_to_load_is_reported(pools: Callable[..., Any]) -> None:
    pool: InferencePool = await pools(version("1"))
    reports, report = reporter()
    reconciler = PoolReconciler(pool, report, replica_id="r1")
    broken = version("2", loader="broken")
    await reconciler(policy("1", revision=1, others={"2": (VersionStatus.LOADING, broken)}))
    await eventually(lambda: any(r[2] == "2" for r in reports))
    [(_, _, _, ok, error)] = [r for r in reports if r[2] == "2"]
    assert not ok
    assert "weights are corrupt" in (error or "")
    await reconciler(policy("1", revision=1, others={"2": (VersionStatus.LOADING, broken)}))
    await reconciler.settled()
    assert len([r for r in reports if r[2] == "2"]) == 1  # not again for the same revision
    assert set(pool.versions()) == {(MODEL, "1")}
    assert (await pool.infer(MODEL, [2]))[0][:2] == (2, "1")
    await reconciler.close()


async def test_closing_cancels_a_load(pools: Callable[..., Any]) -> None:
    pool: InferencePool = await pools(version("1"))
    reports, report = reporter()
    reconciler = PoolReconciler(pool, report, replica_id="r1")
    slow = version("2", load_s=30)
    await reconciler(policy("1", revision=1, others={"2": (VersionStatus.LOADING, slow)}))
    await eventually(lambda: (MODEL, "2") in pool.versions())
    async with asyncio.timeout(10):
        await reconciler.close()
    assert set(pool.versions()) == {(MODEL, "1")}
    assert all(r[2] != "2" for r in reports)
