"""Vision jobs on model versions, with real pool workers: each task runs the version routing
picks (a pin `name@version`, else the registry's policy) and records the one that served; a pin
to a version that is not served is refused, naming the versions there are."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import pytest
from redis.asyncio import Redis

from backend.auth.principal import Principal
from backend.core.db import Database
from backend.errors import ValidationFailed
from backend.inference.catalog import Task
from backend.inference.manifest import ModelManifest
from backend.inference.pool import InferencePool
from backend.lifecycle.policy import (
    Arm,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    TrafficPolicy,
    VersionStatus,
)
from backend.lifecycle.router import ModelRouter
from backend.vision.service import VisionService, VisionTask
from tests.knowledge.test_service import database, new_principal
from tests.vision.test_recovery import photo, stop, vision

__all__ = ["database"]  # fixture

MODEL = "toy-classifier"


def classifier(version: str, top: int) -> ModelManifest:
    return ModelManifest(
        name=MODEL,
        version=version,
        task=Task.CLASSIFICATION,
        runtime="python",
        loader="tests.inference.toys:top_class",
        input={"size": 16, "top": top},
        labels=("one", "two"),
    )


def live(version: str, revision: int) -> RegistrySnapshot:
    records = tuple(
        ModelVersionRecord(MODEL, v, ModelKind.VISION, "classification", VersionStatus.LIVE)
        for v in ("1", "2")
    )
    policy = TrafficPolicy(MODEL, (Arm(version, 100),), revision=revision)
    return RegistrySnapshot({MODEL: records}, {MODEL: policy}, revision=revision)


async def served(service: VisionService, principal: Principal, **models: str) -> dict[str, Any]:
    """The classification task's stored result, once its job has ended."""
    job = await service.analyze(principal, photo(), [VisionTask.CLASSIFY], **models)
    events = await service.job_events(principal, job.id, None)
    async with asyncio.timeout(60), aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if event.terminal:
                break
    row = await service.job(principal, job.id)
    return dict(row.results["classify"])


async def test_each_task_records_the_version_that_served(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    pool = InferencePool([classifier("1", top=0)])
    await pool.start()
    router = ModelRouter.over(pool)
    service = vision(database, redis, key_prefix, pool, router, classifier=MODEL)
    service.start()
    try:
        await pool.wait_ready()
        principal = await new_principal(database)
        first = await served(service, principal)
        assert (first["model"], first["version"]) == (MODEL, "1")
        assert first["result"]["classes"][0]["label"] == "one"

        await pool.add(classifier("2", top=1))
        router.apply(live("2", revision=1))  # the registry switched its policy
        second = await served(service, principal)
        assert (second["model"], second["version"]) == (MODEL, "2")
        assert second["result"]["classes"][0]["label"] == "two"  # version 2 ran

        pinned = await served(service, principal, classifier=f"{MODEL}@1")
        assert (pinned["model"], pinned["version"]) == (MODEL, "1")
        assert pinned["result"]["classes"][0]["label"] == "one"

        with pytest.raises(ValidationFailed) as refused:
            await service.analyze(
                principal, photo(), [VisionTask.CLASSIFY], classifier=f"{MODEL}@9"
            )
        assert refused.value.code == "BAD_USER_INPUT"
        assert refused.value.details["field"] == "classifier"
        assert refused.value.details["available"] == ["1", "2"]  # the default here first
        with pytest.raises(ValidationFailed, match="no classification model"):
            await service.analyze(principal, photo(), [VisionTask.CLASSIFY], classifier="nothing@1")
        with pytest.raises(ValidationFailed, match="tesseract has no version"):
            await service.analyze(principal, photo(), [VisionTask.OCR], ocr_engine="tesseract@0")
    finally:
        await stop(service)
        await pool.close()


async def test_a_job_accepted_before_its_version_retired_runs_on_the_live_one(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    """Routing happens when a task runs: a retired version is never asked for."""
    pool = InferencePool([classifier("1", top=0)])
    await pool.start()
    await pool.add(classifier("2", top=1))
    router = ModelRouter.over(pool)
    router.apply(live("1", revision=1))
    pool.set_default(MODEL, "2")
    await pool.remove(MODEL, "1", grace_s=1)
    # the snapshot still says 1 (this replica is behind the registry): 2 serves
    service = vision(database, redis, key_prefix, pool, router, classifier=MODEL)
    service.start()
    try:
        principal = await new_principal(database)
        result = await served(service, principal)
        assert result["version"] == "2"
    finally:
        await stop(service)
        await pool.close()
