"""Replicas converge on the registry: two RegistryWatchers (two replicas, each with its own
connection pool) on a committed database and the real Redis take in a policy change through
pub/sub; one that misses the message converges on its periodic reconcile; a failing listener
does not keep the state from the others; seeding from two replicas at once registers each
model once; a loading version becomes ready once both replicas report it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.app import build_signer
from backend.auth.service import AuthService
from backend.config import DatabaseSettings, LifecycleSettings, ModelSpec, Settings
from backend.core.db import Database
from backend.core.migrations import upgrade_to_head
from backend.core.redis import KeySpace
from backend.lifecycle.policy import Arm, ModelKind, RegistrySnapshot, VersionStatus
from backend.lifecycle.seeding import served_models
from backend.lifecycle.service import ModelRegistryService
from backend.lifecycle.watcher import RegistryWatcher
from tests.conftest import empty_database, scaled
from tests.lifecycle.conftest import chat_spec, vision_spec, weights_file


@pytest.fixture(scope="module")
async def committed(engine: AsyncEngine) -> AsyncIterator[str]:
    """A database of its own, migrated: what one replica commits, the others read."""
    async with empty_database(engine) as fresh:
        await upgrade_to_head(fresh)
        yield fresh.url.render_as_string(hide_password=False)


class Replica:
    """One replica's registry service and watcher, with the states its listener got."""

    def __init__(
        self, url: str, redis: Redis, prefix: str, settings: Settings, lifecycle: LifecycleSettings
    ) -> None:
        self.db = Database.connect(url, DatabaseSettings(pool_size=2))
        keys = KeySpace(prefix)
        auth = AuthService(self.db, build_signer(settings), redis, keys, settings.auth)
        self.service = ModelRegistryService(
            db=self.db, redis=redis, keys=keys, settings=lifecycle, auth=auth, operator_tenant=None
        )
        self.watcher = RegistryWatcher(self.service, redis, lifecycle)
        self.seen: list[RegistrySnapshot] = []

        self.watcher.add_listener(self.listener)

    async def listener(self, snapshot: RegistrySnapshot) -> None:
        self.seen.append(snapshot)

    async def close(self) -> None:
        await self.watcher.close()
        await self.db.dispose()


@pytest.fixture
async def replicas(
    committed: str, redis: Redis, key_prefix: str, settings: Settings
) -> AsyncIterator[list[Replica]]:
    """Two replicas on one Redis prefix that reconcile only once an hour (only pub/sub can
    make them converge within a test), and a third on another prefix (it never hears the
    messages) that reconciles every 0.3 s."""
    slow = LifecycleSettings(reconcile_s=3600, heartbeat_s=0.2)
    made = [
        Replica(committed, redis, key_prefix, settings, slow),
        Replica(committed, redis, key_prefix, settings, slow),
        Replica(
            committed, redis, key_prefix + "deaf:", settings, LifecycleSettings(reconcile_s=0.3)
        ),
    ]
    try:
        yield made
    finally:
        for replica in made:
            await replica.close()


async def converged(replica: Replica, check: object, timeout_s: float = 20) -> RegistrySnapshot:
    """Waits (generously) until the replica's state passes `check`."""
    async with asyncio.timeout(scaled(timeout_s)):
        while not check(replica.watcher.snapshot):  # type: ignore[operator]
            await asyncio.sleep(0.02)
    return replica.watcher.snapshot


async def test_two_replicas_converge_on_a_policy_change(replicas: list[Replica]) -> None:
    one, two, _ = replicas
    await one.service.register_version(
        None, "assistant-a", "1", kind=ModelKind.CHAT, spec=chat_spec()
    )
    await one.service.register_version(None, "assistant-a", "2", spec=chat_spec())
    await one.service.set_traffic_policy(None, "assistant-a", [Arm("1", 100)])
    for replica in (one, two):
        await replica.watcher.start()
        assert replica.watcher.snapshot.policies["assistant-a"].live == "1"  # read at start
    change = await one.service.set_traffic_policy(None, "assistant-a", [Arm("1", 50), Arm("2", 50)])
    revision = one.service.last_revision
    for replica in (one, two):
        assert await replica.watcher.wait_for(revision, scaled(20))
        policy = replica.watcher.snapshot.policies["assistant-a"]
        assert policy == change
        assert replica.seen[-1].revision == revision  # the listener got it too


async def test_a_replica_that_missed_the_message_converges_on_reconcile(
    replicas: list[Replica],
) -> None:
    one, _, deaf = replicas

    async def broken(_: RegistrySnapshot) -> None:
        raise RuntimeError("a listener that fails")

    deaf.watcher.remove_listener(deaf.listener)
    deaf.watcher.add_listener(broken)  # first: the next one gets the state all the same
    deaf.watcher.add_listener(deaf.listener)
    await one.service.register_version(
        None, "assistant-b", "1", kind=ModelKind.CHAT, spec=chat_spec()
    )
    await deaf.watcher.start()
    await one.service.set_traffic_policy(None, "assistant-b", [Arm("1", 100)])
    snapshot = await converged(deaf, lambda s: "assistant-b" in s.policies)
    assert snapshot.revision >= one.service.last_revision
    assert deaf.seen  # after the broken listener, all the same
    assert "assistant-b" in deaf.seen[-1].policies


async def test_two_replicas_seeding_at_once_register_each_model_once(
    replicas: list[Replica],
) -> None:
    one, two, _ = replicas
    entries = served_models(
        [],
        {
            "seed-chat": ModelSpec(provider="openai", base_url="http://llm.example/v1"),
            "seed-fast": ModelSpec(provider="openai", base_url="http://fast.example/v1"),
        },
    )
    first, second = await asyncio.gather(one.service.seed(entries), two.service.seed(entries))
    assert sorted(first + second) == [("seed-chat", "1"), ("seed-fast", "1")]
    snapshot = await one.service.snapshot()
    for model in ("seed-chat", "seed-fast"):
        assert [r.status for r in snapshot.versions[model]] == [VersionStatus.LIVE]
        assert snapshot.policies[model].revision == 1


async def test_a_loading_version_is_ready_once_every_replica_reported(
    replicas: list[Replica], tmp_path: Path
) -> None:
    one, two, _ = replicas
    for replica in (one, two):
        await replica.watcher.start()  # each says it is alive
    weights, digest = weights_file(tmp_path)
    await one.service.register_version(
        None,
        "detector-c",
        "1",
        kind=ModelKind.VISION,
        task="detection",
        spec={**vision_spec(weights, digest), "task": "detection"},
    )

    def status(snapshot: RegistrySnapshot) -> VersionStatus | None:
        records = snapshot.versions.get("detector-c", ())
        return records[0].status if records else None

    await converged(two, lambda s: status(s) is VersionStatus.LOADING)
    await one.watcher.report("detector-c", "1", ok=True)
    assert status(await one.service.snapshot()) is VersionStatus.LOADING  # two has not yet
    await two.watcher.report("detector-c", "1", ok=True)
    for replica in (one, two):
        await converged(replica, lambda s: status(s) is VersionStatus.READY)
