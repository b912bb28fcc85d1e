"""The registry service on a real PostgreSQL: registering versions (sha256 checks), policies and
their validation (typed errors, the policy in force unchanged), promotion, rollback, retiring,
pins, who may do what, audit entries, seeding, and replicas' readiness of loading versions."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.config import DriftSettings, LifecycleSettings, ModelSpec
from backend.core.db import Database
from backend.core.metrics import Metrics
from backend.core.redis import KeySpace
from backend.errors import AppError
from backend.inference.catalog import Task
from backend.inference.manifest import ModelManifest
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.policy import (
    Arm,
    CanaryGuard,
    ModelKind,
    RouteReason,
    StickyKey,
    VersionStatus,
)
from backend.lifecycle.seeding import served_models
from backend.lifecycle.service import ModelRegistryService
from tests.lifecycle.conftest import (
    People,
    audit,
    chat_model,
    chat_spec,
    vision_spec,
    weights_file,
)


async def refused(code: str, work: object) -> AppError:
    with pytest.raises(AppError) as caught:
        await work  # type: ignore[misc]
    assert caught.value.code == code, caught.value
    return caught.value


async def statuses(registry: ModelRegistryService, model: str) -> dict[str, str]:
    found = await registry.model(None, model)
    return {v.version: v.status for v in found.versions}


async def test_register_checks_names_kinds_duplicates_and_audits(
    registry: ModelRegistryService, people: People, db_connection: AsyncConnection
) -> None:
    version = await registry.register_version(
        people.operator, "scribe", "1", kind=ModelKind.CHAT, spec=chat_spec(), notes="first"
    )
    assert (version.status, version.notes) == ("ready", "first")  # nothing to load
    assert version.registered_by == people.operator.user_id
    details = await registry.model(people.operator, "scribe")
    assert (details.kind, details.task, details.policy) == (ModelKind.CHAT, "chat", None)

    await refused(
        "MODEL_VERSION_EXISTS",
        registry.register_version(people.operator, "scribe", "1", spec=chat_spec()),
    )
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator,
            "newcomer",
            "1",
            spec=chat_spec(),  # a new model needs its kind
        ),
    )
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator, "scribe", "2", kind=ModelKind.EMBEDDING, spec={}
        ),
    )
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(people.operator, "scribe", "v@2", spec=chat_spec()),
    )
    bad = await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator, "scribe", "3", spec={"provider": "carrier-pigeon"}
        ),
    )
    assert bad.details["problems"]
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator, "scribe", "4", spec=chat_spec(), sha256="not-a-digest"
        ),
    )

    [entry] = await audit(db_connection, "model.version_registered")
    assert entry["tenant_id"] == people.operator.tenant_id
    assert entry["actor_id"] == people.operator.user_id
    assert entry["details"] == {"model": "scribe", "version": "1"}


async def test_a_vision_version_is_checked_against_its_sha256_then_loads(
    registry: ModelRegistryService, people: People, tmp_path: Path
) -> None:
    weights, digest = weights_file(tmp_path)
    loading = await registry.register_version(
        people.operator,
        "ocr-net",
        "1",
        kind=ModelKind.VISION,
        task="classification",
        spec=vision_spec(weights, digest),
    )
    assert loading.status == "loading"  # every replica loads it before traffic may reach it
    assert loading.sha256 == digest
    assert loading.spec["name"] == "ocr-net"
    assert loading.spec["version"] == "1"

    wrong = "0" * 64
    await refused(
        "CHECKSUM_MISMATCH",
        registry.register_version(
            people.operator, "ocr-net", "2", spec=vision_spec(weights, wrong)
        ),
    )
    # the version's sha256 checks weights whose manifest names none
    await refused(
        "CHECKSUM_MISMATCH",
        registry.register_version(
            people.operator, "ocr-net", "3", spec=vision_spec(weights, None), sha256=wrong
        ),
    )
    checked = await registry.register_version(
        people.operator, "ocr-net", "4", spec=vision_spec(weights, None), sha256=digest
    )
    assert checked.spec["sha256"] == digest
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator, "ocr-net", "5", spec=vision_spec(tmp_path / "gone.onnx", digest)
        ),
    )
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator,
            "ocr-net",
            "6",
            spec={**vision_spec(weights, digest), "runtime": "magic"},
        ),
    )
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator, "ocr-net", "7", spec={**vision_spec(weights, digest), "task": "ocr"}
        ),
    )
    await refused(
        "INVALID_MODEL_SPEC",
        registry.register_version(
            people.operator, "ocr-net", "8", spec={**vision_spec(weights, digest), "name": "other"}
        ),
    )
    assert set(await statuses(registry, "ocr-net")) == {"1", "4"}


async def test_policy_validation_is_typed_and_leaves_the_policy_in_force(
    registry: ModelRegistryService, people: People
) -> None:
    await chat_model(registry, "scribe", "1", "2", "3", "4")
    first = await registry.set_traffic_policy(people.operator, "scribe", [Arm("1", 100)])
    assert first.revision == 1

    bad_policies = [
        ("INVALID_TRAFFIC_POLICY", [Arm("1", 60), Arm("2", 30)], {}),  # 90, not 100
        ("INVALID_TRAFFIC_POLICY", [], {}),
        ("INVALID_TRAFFIC_POLICY", [Arm("1", 50), Arm("1", 50)], {}),
        ("INVALID_TRAFFIC_POLICY", [Arm("1", 100), Arm("2", 0)], {}),
        ("INVALID_TRAFFIC_POLICY", [Arm("1", float("nan"))], {}),
        ("MODEL_VERSION_NOT_FOUND", [Arm("1", 50), Arm("9", 50)], {}),
        ("INVALID_TRAFFIC_POLICY", [Arm("1", 90), Arm("2", 10)], {"shadow": "2"}),  # shadow=live
        ("INVALID_TRAFFIC_POLICY", [Arm("1", 100)], {"shadow": "3", "shadow_rate": 1.5}),
        ("INVALID_TRAFFIC_POLICY", [Arm("1", 100)], {"shadow": None, "shadow_rate": 0.2}),
        ("MODEL_VERSION_NOT_FOUND", [Arm("1", 100)], {"shadow": "9", "shadow_rate": 0.1}),
        ("INVALID_TRAFFIC_POLICY", [Arm("1", 100)], {"canary": CanaryGuard(max_p95_ratio=0.5)}),
        ("STALE_TRAFFIC_POLICY", [Arm("1", 100)], {"expected_revision": 7}),
    ]
    for code, arms, options in bad_policies:
        await refused(code, registry.set_traffic_policy(people.operator, "scribe", arms, **options))
    await refused(
        "MODEL_NOT_FOUND", registry.set_traffic_policy(people.operator, "nobody", [Arm("1", 100)])
    )
    unchanged = (await registry.model(None, "scribe")).policy
    assert unchanged == first
    assert (await statuses(registry, "scribe"))["1"] == "live"

    split = await registry.set_traffic_policy(
        people.operator,
        "scribe",
        [Arm("1", 90), Arm("2", 10)],
        sticky=StickyKey.TENANT,
        shadow="3",
        shadow_rate=0.25,
        canary=CanaryGuard(min_requests=10),
        expected_revision=1,
    )
    assert split.revision == 2
    assert (split.live, split.sticky, split.shadow) == ("1", StickyKey.TENANT, "3")
    assert await statuses(registry, "scribe") == {
        "1": "live",
        "2": "canary",
        "3": "shadow",
        "4": "ready",
    }
    kept = await registry.set_traffic_policy(
        people.operator, "scribe", [Arm("1", 75), Arm("2", 25)]
    )
    assert (kept.sticky, kept.shadow, kept.shadow_rate) == (StickyKey.TENANT, "3", 0.25)
    assert kept.canary == CanaryGuard(min_requests=10)


async def test_traffic_reaches_only_versions_ready_everywhere(
    registry: ModelRegistryService, people: People, tmp_path: Path
) -> None:
    weights, digest = weights_file(tmp_path)
    for version in ("1", "2"):
        await registry.register_version(
            people.operator,
            "classifier",
            version,
            kind=ModelKind.VISION,
            task="classification",
            spec=vision_spec(weights, digest),
        )
    await refused(
        "MODEL_VERSION_NOT_SERVABLE",
        registry.set_traffic_policy(people.operator, "classifier", [Arm("1", 100)]),
    )
    await registry.replicas.heartbeat("replica-a")
    await registry.replicas.heartbeat("replica-b")
    assert await registry.report_readiness("replica-a", "classifier", "1", ok=True) is None
    ready = await registry.report_readiness("replica-b", "classifier", "1", ok=True)
    assert ready is VersionStatus.READY  # every live replica has it
    failed = await registry.report_readiness(
        "replica-b", "classifier", "2", ok=False, error="out of memory"
    )
    assert failed is VersionStatus.FAILED
    details = {v.version: v for v in (await registry.model(None, "classifier")).versions}
    assert details["2"].error == "replica replica-b: out of memory"
    await registry.set_traffic_policy(people.operator, "classifier", [Arm("1", 100)])
    await refused(
        "MODEL_VERSION_NOT_SERVABLE", registry.promote_version(people.operator, "classifier", "2")
    )


async def test_a_replica_that_left_is_not_waited_for(
    registry: ModelRegistryService, people: People, tmp_path: Path
) -> None:
    weights, digest = weights_file(tmp_path)
    await registry.register_version(
        people.operator,
        "classifier",
        "1",
        kind=ModelKind.VISION,
        task="classification",
        spec=vision_spec(weights, digest),
    )
    await registry.replicas.heartbeat("stays")
    await registry.replicas.heartbeat("goes")
    assert await registry.report_readiness("stays", "classifier", "1", ok=True) is None
    await registry.replicas.leave("goes")
    assert await registry.replicas.live() == ["stays"]
    assert await registry.settle("classifier", "1") is VersionStatus.READY


async def test_promote_and_rollback_walk_the_policy_history(
    registry: ModelRegistryService, people: People, db_connection: AsyncConnection
) -> None:
    await chat_model(registry, "scribe", "1", "2", "3")
    await registry.set_traffic_policy(people.operator, "scribe", [Arm("1", 100)])
    await registry.set_traffic_policy(
        people.operator, "scribe", [Arm("1", 95), Arm("2", 5)], shadow="3", shadow_rate=0.1
    )
    promoted = await registry.promote_version(people.operator, "scribe", "3")
    assert [(a.version, a.weight) for a in promoted.arms] == [("3", 100)]
    assert (promoted.shadow, promoted.revision) == (None, 3)  # the shadow it was ends
    assert await statuses(registry, "scribe") == {"1": "ready", "2": "ready", "3": "live"}

    back = await registry.rollback_model(people.operator, "scribe", reason="drill")
    assert [(a.version, a.weight) for a in back.arms] == [("1", 95), ("2", 5)]
    assert (back.shadow, back.revision) == ("3", 4)
    assert await statuses(registry, "scribe") == {"1": "live", "2": "canary", "3": "shadow"}
    further = await registry.rollback_model(people.operator, "scribe")
    assert [(a.version, a.weight) for a in further.arms] == [("1", 100)]
    assert further.shadow is None
    await refused("NOTHING_TO_ROLL_BACK", registry.rollback_model(people.operator, "scribe"))
    await refused("MODEL_NOT_FOUND", registry.rollback_model(people.operator, "nobody"))

    rollbacks = await audit(db_connection, "model.policy_rollback")
    assert [r["details"]["restored"] for r in rollbacks] == [2, 1]
    assert rollbacks[0]["details"]["reason"] == "drill"
    assert len(await audit(db_connection, "model.policy_promote")) == 1


async def test_a_promoted_version_restarts_its_drift_reference(
    registry: ModelRegistryService, people: People, db: Database, redis: Redis, key_prefix: str
) -> None:
    """The reference is the first requests after promotion: what the version served as a
    canary (other traffic) is not kept as its reference once it is live."""
    drift = DriftSettings(reference_size=4, window_size=4, min_samples=2)
    operations = ModelOperations(
        redis, KeySpace(key_prefix), LifecycleSettings(), Metrics(), drift=drift, db=db
    )
    assert operations.drift_watch is not None
    samples = operations.drift_watch.samples
    registry.on_promoted = operations.promoted
    await chat_model(registry, "scribe", "1", "2")
    await registry.set_traffic_policy(people.operator, "scribe", [Arm("1", 90), Arm("2", 10)])

    async def reference() -> list[float]:
        windows = await samples.windows("scribe", "2")
        return [sample.value for sample in windows["answer_length"].reference]

    for length in (10.0, 11.0, 12.0, 13.0):  # as a canary
        samples.recorder.add("scribe", "2", "answer_length", length)
    samples.recorder.add("scribe", "2", "answer_length", 14.0)  # not flushed yet
    await samples.flush()
    assert await reference() == [10.0, 11.0, 12.0, 13.0]

    samples.recorder.add("scribe", "2", "answer_length", 15.0)  # before the promotion
    await registry.promote_version(people.operator, "scribe", "2")
    assert await reference() == []  # starts afresh; the history stays
    samples.recorder.add("scribe", "2", "answer_length", 99.0)
    await samples.flush()
    assert await reference() == [99.0]

    await registry.promote_version(people.operator, "scribe", "2")  # live already: kept
    assert await reference() == [99.0]


async def test_retire_is_refused_while_traffic_or_a_pin_reaches_the_version(
    registry: ModelRegistryService, people: People
) -> None:
    await chat_model(registry, "scribe", "1", "2", "3")
    await registry.set_traffic_policy(
        people.operator, "scribe", [Arm("1", 100)], shadow="2", shadow_rate=0.5
    )
    await refused("MODEL_VERSION_IN_USE", registry.retire_version(people.operator, "scribe", "1"))
    await refused("MODEL_VERSION_IN_USE", registry.retire_version(people.operator, "scribe", "2"))
    await registry.pin_version(people.admin, "scribe", "3")
    await refused("MODEL_VERSION_IN_USE", registry.retire_version(people.operator, "scribe", "3"))
    assert await registry.unpin_version(people.admin, "scribe") is True
    assert await registry.unpin_version(people.admin, "scribe") is False
    retired = await registry.retire_version(people.operator, "scribe", "3")
    assert retired.status == "retired"
    await refused(
        "MODEL_VERSION_NOT_SERVABLE",
        registry.set_traffic_policy(people.operator, "scribe", [Arm("1", 50), Arm("3", 50)]),
    )
    await refused("MODEL_VERSION_NOT_SERVABLE", registry.pin_version(people.admin, "scribe", "3"))
    await refused(
        "MODEL_VERSION_NOT_FOUND", registry.retire_version(people.operator, "scribe", "9")
    )


async def test_who_may_do_what(
    registry: ModelRegistryService, people: People, db_connection: AsyncConnection
) -> None:
    await chat_model(registry, "scribe", "1", "2", principal=people.operator)
    await registry.set_traffic_policy(people.operator, "scribe", [Arm("1", 100)])
    for principal in (people.admin, people.member):
        await refused(
            "FORBIDDEN", registry.register_version(principal, "scribe", "3", spec=chat_spec())
        )
        await refused(
            "FORBIDDEN", registry.set_traffic_policy(principal, "scribe", [Arm("2", 100)])
        )
        await refused("FORBIDDEN", registry.promote_version(principal, "scribe", "2"))
        await refused("FORBIDDEN", registry.rollback_model(principal, "scribe"))
        await refused("FORBIDDEN", registry.retire_version(principal, "scribe", "2"))
    # tenant admins read, and pin for their own tenant only
    assert "scribe" in [m.name for m in await registry.models(people.admin)]
    pin = await registry.pin_version(people.admin, "scribe", "2")
    assert pin.tenant_id == people.admin.tenant_id
    # another tenant does not exist for them
    await refused(
        "NOT_FOUND",
        registry.pin_version(people.admin, "scribe", "2", tenant_id=people.operator.tenant_id),
    )
    await refused(
        "NOT_FOUND", registry.pin_version(people.operator, "scribe", "2", tenant_id=uuid.uuid4())
    )
    # members neither read nor pin
    await refused("FORBIDDEN", registry.models(people.member))
    await refused("FORBIDDEN", registry.pin_version(people.member, "scribe", "2"))
    # operators pin for any tenant, and see every tenant's pins
    await registry.pin_version(people.operator, "scribe", "1", tenant_id=people.member.tenant_id)
    seen = (await registry.model(people.operator, "scribe")).pins
    assert [(p.tenant_id, p.version) for p in seen] == [(people.member.tenant_id, "1")]
    own = (await registry.model(people.admin, "scribe")).pins
    assert [(p.tenant_id, p.version) for p in own] == [(people.admin.tenant_id, "1")]

    denials = await audit(db_connection, "permission.denied")
    assert {d["details"]["what"] for d in denials} >= {
        "Mutation.registerModelVersion",
        "Mutation.setTrafficPolicy",
        "Query.models",
        "Mutation.pinModelVersion",
    }
    [pinned_by_operator] = [
        p for p in await audit(db_connection, "model.pinned") if p["details"]["version"] == "1"
    ]
    assert pinned_by_operator["actor_id"] == people.operator.user_id
    assert pinned_by_operator["tenant_id"] == people.member.tenant_id  # the tenant's own log


async def test_snapshot_routes_pins_and_policies(
    registry: ModelRegistryService, people: People
) -> None:
    await chat_model(registry, "scribe", "1", "2")
    await registry.set_traffic_policy(people.operator, "scribe", [Arm("1", 80), Arm("2", 20)])
    await registry.pin_version(people.admin, "scribe", "2")
    snapshot = await registry.snapshot()
    assert snapshot.revision == registry.last_revision
    assert snapshot.policies["scribe"].live == "1"
    assert snapshot.pins[(str(people.admin.tenant_id), "scribe")] == "2"
    versions = {r.version: r for r in snapshot.versions["scribe"]}
    assert versions["2"].status is VersionStatus.CANARY
    assert versions["2"].kind is ModelKind.CHAT
    assert RouteReason.TENANT_PIN  # the router (another module) reads pins by this key


async def test_seeding_is_idempotent_and_keeps_the_policy_in_force(
    registry: ModelRegistryService, tmp_path: Path
) -> None:
    # names of this test's own: servers of other tests commit what they seed
    tag = uuid.uuid4().hex[:8]
    detector, alias, embedder = f"detector-{tag}", f"alias-{tag}", f"embedder-{tag}"
    weights, digest = weights_file(tmp_path)

    def manifest(version: str) -> ModelManifest:
        return ModelManifest(
            name=detector,
            version=version,
            task=Task.DETECTION,
            runtime="onnx",
            weights=str(weights),
            sha256=digest,
        )

    entries = served_models(
        [manifest("1")],
        {alias: ModelSpec(provider="openai", base_url="http://llm.example/v1")},
        (f"{embedder}@0.1.0", 384, None),
    )
    added = await registry.seed(entries)
    assert sorted(added) == sorted([(embedder, "0.1.0"), (alias, "1"), (detector, "1")])
    assert await registry.seed(entries) == []
    snapshot = await registry.snapshot()
    for model, version in added:
        policy = snapshot.policies[model]
        assert [(a.version, a.weight) for a in policy.arms] == [(version, 100)]
        [record] = snapshot.versions[model]
        assert record.status is VersionStatus.LIVE
    kinds = {m: snapshot.versions[m][0].kind for m in (detector, alias, embedder)}
    assert kinds == {
        detector: ModelKind.VISION,
        alias: ModelKind.CHAT,
        embedder: ModelKind.EMBEDDING,
    }
    # a new version of a known model (the packages were upgraded) is ready, not live
    assert await registry.seed(served_models([manifest("2")], {})) == [(detector, "2")]
    assert await statuses(registry, detector) == {"1": "live", "2": "ready"}
    assert (await registry.snapshot()).policies[detector].live == "1"


def test_the_tables_know_every_kind_status_and_sticky_key() -> None:
    """The tables keep these as strings under a CHECK (infrastructure imports no domain):
    the lists there are the enums' values."""
    from backend.core.models import lifecycle as tables

    assert tuple(k.value for k in ModelKind) == tables.MODEL_KINDS
    assert tuple(s.value for s in VersionStatus) == tables.VERSION_STATUSES
    assert tuple(k.value for k in StickyKey) == tables.STICKY_KEYS
