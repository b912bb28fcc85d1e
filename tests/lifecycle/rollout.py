"""A toy classifier's rollout on a live server, driven as the server itself (principal None, as
the CLI): version 1 live with version 2 as its shadow (every request mirrored), then version 2
as a guarded canary at half the traffic, then promoted; jobs served at each step. What the
Models dashboard, the operations view and their tests show."""

from __future__ import annotations

import asyncio
import secrets

from backend.lifecycle.policy import Arm, CanaryGuard, ModelKind, VersionStatus
from backend.services import Services
from tests.conftest import scaled
from tests.lifecycle.test_vision_swap import served, toy

# a guard that cannot decide within the test (too few requests): no rollback by chance
QUIET_GUARD = CanaryGuard(min_requests=1_000_000)


async def _ready(services: Services, model: str, version: str) -> None:
    assert services.registry is not None
    async with asyncio.timeout(scaled(120)):  # loaded and warmed by the replica
        while True:
            snapshot = await services.registry.snapshot()
            status = {v.version: v.status for v in snapshot.versions.get(model, ())}[version]
            assert status is not VersionStatus.FAILED
            if status in (VersionStatus.READY, VersionStatus.LIVE):
                return
            await asyncio.sleep(0.2)


async def _taken_in(services: Services) -> None:
    assert services.registry is not None
    assert services.models_watcher is not None
    assert await services.models_watcher.wait_for(services.registry.last_revision, scaled(30))


async def _mirrored(services: Services) -> None:
    """Until the shadow's comparisons of the jobs served so far are counted."""
    assert services.lifecycle is not None
    shadows = services.lifecycle.shadows
    async with asyncio.timeout(scaled(60)):
        while shadows.in_flight:
            await asyncio.sleep(0.05)


async def rollout(
    services: Services,
    tenant: str,
    email: str,
    jobs: int = 3,
    *,
    pause: float = 0.0,
    rolled_back: bool = False,
) -> str:
    """Registers a toy classifier and rolls version 2 out (shadow, canary, promotion), serving
    `jobs` classification jobs of `email` in `tenant` at each step, `pause` seconds apart (a
    picture over minutes); `rolled_back`: the first canary is rolled back as the guard would,
    then tried again. Returns the model's name."""
    assert services.registry is not None
    registry = services.registry
    model = f"swap-{secrets.token_hex(3)}"  # the name the registry cleanup of tests knows
    for version, top in (("1", 0), ("2", 1)):
        await registry.register_version(
            None, model, version, kind=ModelKind.VISION, spec=toy(model, version, top)
        )
        await _ready(services, model, version)
    await registry.set_traffic_policy(None, model, [Arm("1", 100)], shadow="2", shadow_rate=1.0)
    await _taken_in(services)
    for _ in range(jobs):
        await served(services, tenant, model, email)
    await _mirrored(services)
    for attempt in range(2 if rolled_back else 1):
        await asyncio.sleep(pause)
        await registry.set_traffic_policy(
            None,
            model,
            [Arm("1", 50), Arm("2", 50)],
            shadow=None,
            shadow_rate=0.0,
            canary=QUIET_GUARD,
        )
        await _taken_in(services)
        for _ in range(jobs):
            await served(services, tenant, model, email)
        if attempt == 0 and rolled_back:
            await asyncio.sleep(pause)
            await registry.rollback_model(None, model, reason="canary guard: error rate")
            await _taken_in(services)
    await asyncio.sleep(pause)
    await registry.promote_version(None, model, "2")
    await _taken_in(services)
    for _ in range(jobs):
        await served(services, tenant, model, email)
    return model
