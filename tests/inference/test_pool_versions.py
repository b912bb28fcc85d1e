"""Several versions of one model in the pool, with real worker processes: a version added under
continuous load serves once every worker has it, a retired one finishes its queued and running
items before every worker unloads it, and a version that fails to load changes nothing."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from backend.inference.catalog import Task
from backend.inference.client import ModelStatus, ModelUnavailable
from backend.inference.manifest import ModelManifest
from backend.inference.pool import InferencePool
from backend.lifecycle.policy import (
    Arm,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    RequestKey,
    TrafficPolicy,
    VersionStatus,
)
from backend.lifecycle.router import ModelRouter, run_routed
from tests.inference.test_pool import pools

__all__ = ["pools"]  # fixture

MODEL = "swap"


def version(name: str, loader: str = "versioned", **options: Any) -> ModelManifest:
    return ModelManifest(
        name=MODEL,
        version=name,
        task=Task.CLASSIFICATION,
        runtime="python",
        loader=f"tests.inference.toys:{loader}",
        input={"warm": 0, **options},
        max_batch=4,
        max_delay_ms=2,
    )


def policy(
    live: str,
    *retired: str,
    revision: int,
    others: dict[str, tuple[VersionStatus, ModelManifest]] | None = None,
) -> RegistrySnapshot:
    """The registry with `live` taking all the traffic, `retired` retired, and `others` (each
    with its status and manifest)."""
    records = [
        ModelVersionRecord(MODEL, live, ModelKind.VISION, "classification", VersionStatus.LIVE),
        *(
            ModelVersionRecord(MODEL, v, ModelKind.VISION, "classification", VersionStatus.RETIRED)
            for v in retired
        ),
        *(
            ModelVersionRecord(MODEL, v, ModelKind.VISION, "classification", status, m.to_dict())
            for v, (status, m) in (others or {}).items()
        ),
    ]
    return RegistrySnapshot(
        {MODEL: tuple(records)},
        {MODEL: TrafficPolicy(MODEL, (Arm(live, 100),), revision=revision)},
        revision=revision,
    )


async def holding(pool: InferencePool, expected: list[list[str]]) -> None:
    """Waits until the worker processes, by their own account, hold `expected` (a worker
    started with the pool may still be loading when the first one serves)."""
    async with asyncio.timeout(60):
        while (held := await pool.worker_models()) != expected:
            await asyncio.sleep(0.05)
    assert held == expected


class Clients:
    """Clients that classify the whole time, each result checked against the version routed."""

    def __init__(self, pool: InferencePool, router: ModelRouter, count: int = 6) -> None:
        self.served: list[tuple[str, str]] = []  # (routed, answered by)
        self.failures: list[BaseException] = []
        self._stop = asyncio.Event()
        numbers = itertools.count()

        async def client(user: int) -> None:
            while not self._stop.is_set():
                n = next(numbers)
                key = RequestKey(tenant_id="t", user_id=f"user-{user}", request_id=str(n))
                try:
                    route, [(value, answered, _)] = await run_routed(
                        router,
                        MODEL,
                        key,
                        None,
                        lambda v, n=n: pool.infer(MODEL, [n], version=v, timeout_s=30),
                    )
                except Exception as exc:
                    self.failures.append(exc)
                    continue
                assert value == n
                self.served.append((route.version, answered))

        self._tasks = [asyncio.create_task(client(i)) for i in range(count)]

    async def until(self, served: int) -> None:
        async with asyncio.timeout(60):
            while len(self.served) < served:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_a_hot_swap_under_load_fails_no_request(pools: Callable[..., Any]) -> None:
    pool: InferencePool = await pools(version("1", seconds=0.01), workers=2)
    router = ModelRouter.over(pool)
    router.apply(policy("1", revision=1))
    clients = Clients(pool, router)
    await clients.until(20)

    await pool.add(version("2", seconds=0.01, load_s=0.5))  # every worker has it warm
    assert pool.versions()[(MODEL, "2")].status is ModelStatus.READY
    assert all(
        sorted(models) == [f"{MODEL}@1", f"{MODEL}@2"] for models in await pool.worker_models()
    )
    await clients.until(len(clients.served) + 20)
    assert {answered for _, answered in clients.served} == {"1"}  # no traffic before the switch

    # items of version 1 queued and running when it is retired: they finish on it
    pinned = asyncio.gather(*(pool.infer(MODEL, [i], version="1") for i in range(12)))
    await asyncio.sleep(0.005)
    router.apply(policy("2", "1", revision=2))
    pool.set_default(MODEL, "2")
    await pool.remove(MODEL, "1", grace_s=30)
    assert {answered for [(_, answered, _)] in await pinned} == {"1"}
    with pytest.raises(ModelUnavailable, match="versions: 2"):
        await pool.infer(MODEL, [1], version="1")

    await clients.until(len(clients.served) + 20)
    await clients.stop()
    assert clients.failures == []
    assert all(routed == answered for routed, answered in clients.served)
    assert {answered for _, answered in clients.served} == {"1", "2"}
    assert clients.served[-1][1] == "2"
    assert set(pool.versions()) == {(MODEL, "2")}
    assert pool.status()[MODEL].manifest.version == "2"
    assert [m.version for m in pool.manifests()] == ["2"]
    assert await pool.worker_models() == [[f"{MODEL}@2"], [f"{MODEL}@2"]]  # unloaded


async def test_a_version_that_fails_to_load_leaves_what_serves(pools: Callable[..., Any]) -> None:
    pool: InferencePool = await pools(version("1"), workers=2)
    router = ModelRouter.over(pool)
    clients = Clients(pool, router, count=3)
    await clients.until(10)
    with pytest.raises(ModelUnavailable, match="weights are corrupt"):
        await pool.add(version("2", loader="broken"))
    await clients.until(len(clients.served) + 10)
    await clients.stop()
    assert clients.failures == []
    assert set(pool.versions()) == {(MODEL, "1")}
    await holding(pool, [[f"{MODEL}@1"], [f"{MODEL}@1"]])
    assert (await pool.infer(MODEL, [3]))[0][:2] == (3, "1")


async def test_a_version_that_loads_too_long_is_dropped(pools: Callable[..., Any]) -> None:
    pool: InferencePool = await pools(version("1"))
    with pytest.raises(ModelUnavailable, match="did not load within"):
        await pool.add(version("2", load_s=5), timeout_s=0.3)
    assert set(pool.versions()) == {(MODEL, "1")}
    assert (await pool.infer(MODEL, [4]))[0][:2] == (4, "1")  # served while it loads
    await holding(pool, [[f"{MODEL}@1"]])  # the worker finishes loading it, then unloads it


async def test_a_replacement_worker_loads_every_version(pools: Callable[..., Any]) -> None:
    pool: InferencePool = await pools(version("1"))
    await pool.add(version("2"))
    with pytest.raises(Exception, match="worker died"):
        await pool.infer(MODEL, [-1], version="2")
    assert (await pool.infer(MODEL, [5], version="2", timeout_s=60))[0][:2] == (5, "2")
    assert (await pool.infer(MODEL, [6], timeout_s=60))[0][:2] == (6, "1")
    assert await pool.worker_models() == [[f"{MODEL}@1", f"{MODEL}@2"]]


async def test_the_default_version_cannot_be_removed_while_others_serve(
    pools: Callable[..., Any],
) -> None:
    pool: InferencePool = await pools(version("1"))
    await pool.add(version("2"))
    with pytest.raises(ModelUnavailable, match="default"):
        await pool.remove(MODEL, "1")
    pool.set_default(MODEL, "2")
    await pool.remove(MODEL, "1", grace_s=5)
    assert (await pool.infer(MODEL, [7]))[0][:2] == (7, "2")
