"""Vision jobs whose replica went away: another replica runs the tasks that have no stored
result from the image stored with the job (or fails it once its attempts are spent); the job's
row and its event stream always end in agreement and its compute hold is settled once. Two
services on one database and Redis play two replicas (the models answer without the packaged
weights; OCR is the real one); tests/faults kills real server processes."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis
from skimage import data as photos
from sqlalchemy import func, select

from backend.auth.principal import Principal
from backend.config import LimitsSettings, VisionSettings
from backend.core.db import Database
from backend.core.models import UsageRecord, VisionJob, VisionStatus, VisionUpload
from backend.core.redis import KeySpace
from backend.inference.client import InferenceClient, ModelUnavailable, Priority
from backend.inference.manifest import ModelManifest, load_manifests
from backend.lifecycle.router import ModelRouter
from backend.limits.budgets import Budgets, Resource
from backend.limits.pricing import ComputePricing
from backend.limits.ratelimit import RateLimiter
from backend.realtime.eventlog import EventsExpired, RunEvent, RunEventLog
from backend.vision.ocr import OcrEngine
from backend.vision.service import VisionService, VisionTask
from tests.knowledge.test_service import database, new_principal

__all__ = ["database"]  # fixture

QUICK = {"job_lease_s": 1, "job_lost_grace_s": 1}
PATIENCE_S = 60.0
CLASSIFY_AND_DETECT = [VisionTask.CLASSIFY, VisionTask.DETECT]


class Models:
    """An inference client that answers as the packaged models would (logits, boxes) without
    loading them; models in `stuck` never answer (the replica hangs mid-task)."""

    def __init__(self, stuck: Sequence[str] = ()) -> None:
        self._manifests = {m.name: m for m in load_manifests(None)}
        self.stuck = set(stuck)
        self.calls: Counter[str] = Counter()

    def manifest(self, model: str, version: str | None = None) -> ModelManifest:
        if model not in self._manifests or version not in (None, self._manifests[model].version):
            raise ModelUnavailable(f"no model named {model!r}")
        return self._manifests[model]

    def manifests(self) -> list[ModelManifest]:
        return list(self._manifests.values())

    async def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        version: str | None = None,
        priority: Priority = Priority.BATCH,
        timeout_s: float | None = None,
    ) -> list[Any]:
        self.calls[model] += 1
        if model in self.stuck:
            await asyncio.Event().wait()
        manifest = self.manifest(model, version)
        if manifest.task.value == "classification":
            return [np.linspace(0, 1, len(manifest.labels), dtype=np.float32) for _ in inputs]
        # one box: [class, score, corners as fractions of the image]
        box = [[1, 0.9, 10 / 451, 20 / 300, 40 / 451, 60 / 300]]
        return [np.asarray(box, dtype=np.float32) for _ in inputs]


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos.chelsea()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def vision(
    database: Database,
    redis: Redis,
    key_prefix: str,
    models: InferenceClient,
    router: ModelRouter | None = None,
    pricing: ComputePricing | None = None,
    ocr: OcrEngine | None = None,
    **settings: object,
) -> VisionService:
    keys = KeySpace(key_prefix)
    return VisionService(
        db=database,
        redis=redis,
        keys=keys,
        inference=models,
        ocr=ocr or OcrEngine(VisionSettings().tessdata),
        limiter=RateLimiter(redis, keys, LimitsSettings(enabled=False)),
        settings=VisionSettings(**{**QUICK, **settings}),  # type: ignore[arg-type]
        budgets=Budgets(redis, keys, LimitsSettings()),
        router=router,
        pricing=pricing,
    )


async def stop(service: VisionService, grace_s: float = 5) -> None:
    await service.close(grace_s)
    await service.events.close()


def stream_key(key_prefix: str, job_id: uuid.UUID) -> str:
    return KeySpace(key_prefix).child("vision").child("run")(f"{{{job_id}}}", "events")


async def until_streamed(
    service: VisionService, principal: Principal, job_id: uuid.UUID, kind: str, task: str
) -> None:
    """Waits until the job's stream holds `kind` for `task` (the job is mid-way)."""
    events = await service.job_events(principal, job_id, None)
    async with asyncio.timeout(PATIENCE_S), aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if event.type == kind and event.data.get("task") == task:
                return
    raise AssertionError(f"the job ended before {kind} {task}")


async def taken_over(
    database: Database,
    redis: Redis,
    key_prefix: str,
    principal: Principal,
    job_id: uuid.UUID,
    models: Models,
    **settings: object,
) -> list[RunEvent]:
    """The job as another replica (running `models`) ends it: its stream, read to the end."""
    service = vision(database, redis, key_prefix, models, **settings)
    service.start()
    try:
        async with asyncio.timeout(PATIENCE_S):
            while True:
                try:
                    events = await service.job_events(principal, job_id, None)
                    return [e async for e in events]
                except EventsExpired:  # no stream yet: the job has not been found yet
                    await asyncio.sleep(0.1)
    finally:
        await stop(service)


async def stored(
    database: Database, tenant_id: uuid.UUID, job_id: uuid.UUID
) -> tuple[VisionJob, VisionUpload | None]:
    async with database.session(tenant_id) as session:
        job = await session.get(VisionJob, job_id)
        assert job is not None
        return job, await session.get(VisionUpload, job_id)


async def held(redis: Redis, key_prefix: str) -> list[float]:
    keys = [k async for k in redis.scan_iter(match=f"{key_prefix}budget:*:held")]
    assert keys, "no compute was ever held"
    return [float(v or 0) for v in await redis.mget(keys)]


async def compute_used(database: Database, tenant_id: uuid.UUID) -> list[float]:
    """The compute-seconds recorded, per settlement: a job's records (one per model version
    its tasks ran on) are written in one transaction, so they share their `created_at`."""
    async with database.session(tenant_id) as session:
        rows = await session.scalars(
            select(func.sum(UsageRecord.amount))
            .where(UsageRecord.resource == Resource.COMPUTE_SECONDS.value)
            .group_by(UsageRecord.created_at)
            .order_by(UsageRecord.created_at)
        )
        return [float(amount) for amount in rows]


def seconds(results: dict[str, Any]) -> float:
    return sum(float(r.get("ms", 0)) for r in results.values()) / 1000


async def left_mid_job(
    database: Database, redis: Redis, key_prefix: str
) -> tuple[Principal, uuid.UUID]:
    """A job whose replica went away with its classification done and stored, and its
    detection under way (its lease is no longer renewed)."""
    principal = await new_principal(database)
    first = vision(database, redis, key_prefix, Models(stuck=["ssd-mobilenet-v2-coco"]))
    first.start()
    job = await first.analyze(principal, photo(), CLASSIFY_AND_DETECT)
    await until_streamed(first, principal, job.id, "VisionTaskCompleted", "classify")
    await stop(first, 0)
    return principal, job.id


async def test_a_job_left_mid_task_is_finished_by_another_replica(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    principal, job_id = await left_mid_job(database, redis, key_prefix)
    row, upload = await stored(database, principal.tenant_id, job_id)
    assert row.status == VisionStatus.RUNNING.value
    assert set(row.results) == {"classify"}  # stored as it completed
    assert upload is not None  # the accepted image waits for whoever takes the job over
    assert upload.options["models"]["detect"] == "ssd-mobilenet-v2-coco"

    models = Models()
    events = await taken_over(database, redis, key_prefix, principal, job_id, models)
    assert [(e.type, e.data.get("task")) for e in events] == [
        ("VisionJobQueued", None),
        ("VisionTaskCompleted", "classify"),
        ("VisionJobResumed", None),
        ("VisionTaskCompleted", "detect"),
        ("VisionJobCompleted", None),
    ]
    assert events[2].data["tasks"] == ["detect"]
    assert models.calls == {"ssd-mobilenet-v2-coco": 1}  # the stored classification is not redone
    row, upload = await stored(database, principal.tenant_id, job_id)
    assert (row.status, row.error_code) == (VisionStatus.COMPLETED.value, None)
    assert set(row.results) == {"classify", "detect"}
    assert row.results["detect"]["result"]["objects"][0]["box"]["width"] == 30
    assert upload is None  # dropped in the transaction that ended the job
    assert await redis.ttl(stream_key(key_prefix, job_id)) > 0  # the ended stream expires
    # the hold is settled once: nothing stays held; what the tasks took is recorded
    assert await held(redis, key_prefix) == [0.0] * 4
    assert await compute_used(database, principal.tenant_id) == [
        pytest.approx(seconds(row.results), abs=1e-6)
    ]


async def test_a_job_out_of_attempts_fails_with_worker_lost_in_row_and_stream(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    principal, job_id = await left_mid_job(database, redis, key_prefix)
    models = Models()
    events = await taken_over(
        database, redis, key_prefix, principal, job_id, models, job_max_attempts=1
    )
    assert [e.type for e in events] == ["VisionJobQueued", "VisionTaskCompleted", "VisionJobFailed"]
    assert events[-1].data["code"] == "WORKER_LOST"
    assert not models.calls
    row, upload = await stored(database, principal.tenant_id, job_id)
    assert (row.status, row.error_code) == (VisionStatus.FAILED.value, "WORKER_LOST")
    assert set(row.results) == {"classify"}  # what was done is kept
    assert upload is None
    assert await redis.ttl(stream_key(key_prefix, job_id)) > 0
    assert await held(redis, key_prefix) == [0.0] * 4
    assert await compute_used(database, principal.tenant_id) == [
        pytest.approx(seconds(row.results), abs=1e-6)
    ]


async def running_job(
    database: Database, principal: Principal, results: dict[str, Any], *, upload: bool
) -> uuid.UUID:
    """A job row left going by a replica that died (updated long ago)."""
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    async with database.session(principal.tenant_id) as session:
        job = VisionJob(
            tenant_id=principal.tenant_id,
            status=VisionStatus.RUNNING.value,
            tasks=["classify", "detect"],
            media_type="image/jpeg",
            width=451,
            height=300,
            size_bytes=100,
            sha256="ab" * 32,
            results=results,
            created_at=long_ago,
            updated_at=long_ago,
        )
        session.add(job)
        await session.flush()
        if upload:
            session.add(
                VisionUpload(job_id=job.id, tenant_id=principal.tenant_id, data=photo(), attempts=1)
            )
    return job.id


async def test_a_job_whose_every_result_was_stored_ends_with_them(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    """The replica stored the last result, then died before it ended the job or streamed
    that result: the job ends as its results say, nothing runs again, the stream gets what
    it missed."""
    principal = await new_principal(database)
    done = {"model": "m", "version": "1", "ms": 5.0, "result": {"classes": []}}
    failed = {"error": {"code": "TIMEOUT", "message": "model too slow"}}
    job_id = await running_job(
        database, principal, {"classify": done, "detect": failed}, upload=True
    )
    log = RunEventLog(redis, KeySpace(key_prefix).child("vision"))
    await log.append(str(job_id), "VisionJobQueued", {"tasks": ["classify", "detect"]})
    await log.append(str(job_id), "VisionTaskCompleted", {"task": "classify", **done})
    member = f"{principal.tenant_id}:{job_id}:"
    await redis.zadd(KeySpace(key_prefix).child("vision")("job-leases"), {member: time.time() - 1})

    models = Models()
    try:
        events = await taken_over(database, redis, key_prefix, principal, job_id, models)
    finally:
        await log.close()
    assert [(e.type, e.data.get("task")) for e in events] == [
        ("VisionJobQueued", None),
        ("VisionTaskCompleted", "classify"),
        ("VisionTaskFailed", "detect"),
        ("VisionJobCompleted", None),
    ]
    assert events[2].data["code"] == "TIMEOUT"
    assert events[-1].data == {"failedTasks": 1}
    assert not models.calls
    row, upload = await stored(database, principal.tenant_id, job_id)
    assert (row.status, upload) == (VisionStatus.COMPLETED.value, None)


async def test_a_job_that_ended_in_the_database_gets_its_last_event(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    """The replica ended the job's row, then died before the stream's terminal event: the
    stream must not stay open for good."""
    principal = await new_principal(database)
    first = vision(database, redis, key_prefix, Models())
    job = await first.analyze(principal, photo(), CLASSIFY_AND_DETECT)
    events = await first.job_events(principal, job.id, None)
    assert [e.type async for e in events][-1] == "VisionJobCompleted"
    await stop(first)
    stream = stream_key(key_prefix, job.id)
    last = await redis.xrevrange(stream, count=1)
    await redis.xdel(stream, last[0][0])  # as if the replica died before appending it
    await redis.persist(stream)
    member = f"{principal.tenant_id}:{job.id}:"
    await redis.zadd(KeySpace(key_prefix).child("vision")("job-leases"), {member: time.time() - 1})

    models = Models()
    events = await taken_over(database, redis, key_prefix, principal, job.id, models)
    assert [e.type for e in events].count("VisionTaskCompleted") == 2  # none streamed twice
    assert events[-1].type == "VisionJobCompleted"
    assert not models.calls
    assert await redis.ttl(stream) > 0
    assert len(await compute_used(database, principal.tenant_id)) == 1  # settled once


async def test_a_job_stuck_with_no_lease_at_all_is_ended(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    """A job left RUNNING by a version without job leases (or whose lease Redis lost with its
    owner) has nothing to claim: the replicas find it in the database and end it."""
    principal = await new_principal(database)
    job_id = await running_job(database, principal, {}, upload=False)
    events = await taken_over(database, redis, key_prefix, principal, job_id, Models())
    assert [e.type for e in events] == ["VisionJobFailed"]
    assert events[-1].data["code"] == "WORKER_LOST"
    row, _ = await stored(database, principal.tenant_id, job_id)
    assert (row.status, row.error_code) == (VisionStatus.FAILED.value, "WORKER_LOST")


async def test_a_hold_whose_job_was_never_stored_goes_back(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    """The replica reserved compute for a job, then died before it stored the job: the
    replica that claims the job's lease finds no job and gives the hold back."""
    principal = await new_principal(database)
    job_id = uuid.uuid4()
    keys = KeySpace(key_prefix)
    await Budgets(redis, keys, LimitsSettings()).reserve(
        tenant_id=principal.tenant_id,
        user_id=None,
        plan="free",
        resource=Resource.COMPUTE_SECONDS,
        amount=10,
        subject="vision",
        hold_id=str(job_id),
    )
    assert await held(redis, key_prefix) == [10.0] * 4
    member = f"{principal.tenant_id}:{job_id}:"
    leases = keys.child("vision")("job-leases")
    await redis.zadd(leases, {member: time.time() - 1})
    second = vision(database, redis, key_prefix, Models())
    second.start()
    try:
        async with asyncio.timeout(PATIENCE_S):
            while await redis.zscore(leases, member) is not None:
                await asyncio.sleep(0.1)
    finally:
        await stop(second)
    assert await held(redis, key_prefix) == [0.0] * 4
    assert await compute_used(database, principal.tenant_id) == []


async def test_a_job_taken_over_charges_the_money_its_replica_had_not(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    """The replica that died had stored its classification (and its cost) but charged no
    money (a job charges at its end); the replica that finishes the job charges the money
    of both tasks, once, and drops the job's money record."""
    pricing = ComputePricing({"cpu": 1.0})
    principal = await new_principal(database)
    first = vision(
        database, redis, key_prefix, Models(stuck=["ssd-mobilenet-v2-coco"]), pricing=pricing
    )
    first.start()
    job = await first.analyze(principal, photo(), CLASSIFY_AND_DETECT)
    await until_streamed(first, principal, job.id, "VisionTaskCompleted", "classify")
    await stop(first, 0)
    budgets = Budgets(redis, KeySpace(key_prefix), LimitsSettings())
    [tenant_day, *_] = budgets._counter_keys(principal.tenant_id, None, Resource.COST)
    assert float(await redis.get(tenant_day) or 0) == 0  # nothing charged yet

    events = await taken_over(
        database, redis, key_prefix, principal, job.id, Models(), pricing=pricing
    )
    assert events[-1].type == "VisionJobCompleted"
    row, _ = await stored(database, principal.tenant_id, job.id)
    cost = sum(float(r["cost"]) for r in row.results.values())
    assert cost > 0
    assert float(await redis.get(tenant_day) or 0) == pytest.approx(cost, abs=1e-6)
    record = budgets._record_key(principal.tenant_id, Resource.COST, str(job.id))
    assert not await redis.exists(record)
