"""The periodic purge: one pass per interval across replicas, owned and stoppable."""

from __future__ import annotations

import asyncio
import uuid

from backend.core.models import UserRole
from backend.privacy.schemas import Removed
from backend.privacy.tasks import PurgeScheduler
from tests.privacy.conftest import Kit, backdate, count, new_tenant, seed


async def test_one_pass_per_interval_whichever_replica_claims_it(kit: Kit) -> None:
    kit.settings.purge_interval_s = 3600
    replicas = [PurgeScheduler(kit.service, kit.redis, kit.keys, kit.settings) for _ in range(2)]
    ran = await asyncio.gather(*(r.run_if_due() for r in replicas))
    assert sorted(ran) == [False, True]
    assert not await replicas[0].run_if_due()
    await kit.redis.delete(kit.keys("privacy", "purge-due"))  # the interval has passed
    assert await replicas[1].run_if_due()


async def test_the_loop_purges_and_stops_when_closed(kit: Kit) -> None:
    tenant, (owner, member) = await new_tenant(kit, UserRole.OWNER, UserRole.MEMBER)
    await seed(kit, tenant, member, tag="old")
    await backdate(kit.db, tenant.id, "messages", 10)
    await kit.service.update_policy(
        tenant.id, {"retention": {"messages_days": 5}}, actor_id=owner.id
    )
    passes: list[Removed] = []
    finished = asyncio.Event()
    purge = kit.service.purge

    async def recorded(tenant_id: uuid.UUID | None = None) -> Removed:
        removed = await purge(tenant_id)
        passes.append(removed)
        finished.set()
        return removed

    kit.service.purge = recorded  # type: ignore[method-assign]
    kit.settings.purge_start_delay_s = 0
    kit.settings.purge_interval_s = 3600
    scheduler = PurgeScheduler(kit.service, kit.redis, kit.keys, kit.settings)
    scheduler.start()
    try:
        async with asyncio.timeout(120):
            await finished.wait()
    finally:
        await scheduler.close()
    assert passes[0].messages == 3
    assert await count(kit.db, tenant.id, "SELECT count(*) FROM messages") == 0


async def test_closing_cancels_a_pass_in_progress(kit: Kit) -> None:
    started = asyncio.Event()

    async def endless(tenant_id: uuid.UUID | None = None) -> Removed:
        started.set()
        await asyncio.Event().wait()
        return Removed()

    kit.service.purge = endless  # type: ignore[method-assign]
    kit.settings.purge_start_delay_s = 0
    scheduler = PurgeScheduler(kit.service, kit.redis, kit.keys, kit.settings)
    scheduler.start()
    async with asyncio.timeout(60):
        await started.wait()
        await scheduler.close()  # returns: the pass was cancelled


async def test_a_disabled_purge_starts_nothing(kit: Kit) -> None:
    kit.settings.purge_enabled = False
    scheduler = PurgeScheduler(kit.service, kit.redis, kit.keys, kit.settings)
    scheduler.start()
    assert not scheduler.running
    await scheduler.close()
