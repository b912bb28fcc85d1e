"""What a vision job costs: each task's model run priced by its version's manifest (else the
settings), in the job's results, in its usage records per model version, in the versions'
serving figures (`modelComparison`) and in the cost metrics."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis
from sqlalchemy import select

from backend.config import LifecycleSettings
from backend.core.db import Database
from backend.core.metrics import Metrics
from backend.core.models import UsageRecord
from backend.core.redis import KeySpace
from backend.inference.manifest import ModelManifest
from backend.lifecycle.operations import ModelOperations
from backend.limits.pricing import ComputePricing
from backend.vision.ocr import OcrEngine
from backend.vision.service import VisionTask
from tests.knowledge.test_service import database, new_principal
from tests.vision.test_recovery import CLASSIFY_AND_DETECT, Models, photo, stop, vision

__all__ = ["database"]  # fixture

CLASSIFIER, DETECTOR = "efficientnet-lite0", "ssd-mobilenet-v2-coco"


class PricedModels(Models):
    """The packaged manifests, the classifier's with its own price on the CPU."""

    def manifest(self, model: str, version: str | None = None) -> ModelManifest:
        manifest = super().manifest(model, version)
        if model == CLASSIFIER:
            return dataclasses.replace(manifest, compute_second_prices={"cpu": 3.0})
        return manifest


async def test_each_task_costs_its_versions_price_in_results_usage_stats_and_metrics(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    metrics = Metrics()
    operations = ModelOperations(redis, KeySpace(key_prefix), LifecycleSettings(), metrics)
    operations.start()
    pricing = ComputePricing({"cpu": 1.0}, metrics)
    service = vision(database, redis, key_prefix, PricedModels(), pricing=pricing, device="cpu")
    service.operations = operations
    principal = await new_principal(database)
    job = await service.analyze(principal, photo(), CLASSIFY_AND_DETECT)
    events = await service.job_events(principal, job.id, None)
    done = {e.data["task"]: e.data async for e in events if e.type == "VisionTaskCompleted"}
    await stop(service)
    await operations.close()  # sends the figures to Redis

    classified, detected = done["classify"], done["detect"]
    # each costs at most its task's whole time at its price (the model's run is within it)
    assert 0 < classified["cost"] <= 3.0 * classified["ms"] / 1000 + 1e-6
    assert 0 < detected["cost"] <= 1.0 * detected["ms"] / 1000 + 1e-6
    async with database.session(principal.tenant_id) as session:
        records = list(await session.scalars(select(UsageRecord)))
    assert sorted((r.model, r.version, r.kind, r.resource) for r in records) == [
        (CLASSIFIER, classified["version"], "vision", "compute_seconds"),
        (DETECTOR, detected["version"], "vision", "compute_seconds"),
    ]
    by_model = {r.model: r for r in records}
    assert by_model[CLASSIFIER].cost == Decimal(str(classified["cost"]))
    assert float(by_model[DETECTOR].amount) == pytest.approx(detected["ms"] / 1000)

    again = ModelOperations(redis, KeySpace(key_prefix), LifecycleSettings(), Metrics())
    figures = await again.stats.window(CLASSIFIER, classified["version"], 60)
    assert (figures.requests, figures.cost) == (1, classified["cost"])
    text = generate_latest(metrics.registry).decode()
    assert (
        f'sightline_model_cost_total{{kind="vision",model="{CLASSIFIER}",'
        f'tenant="{principal.tenant_id}",version="{classified["version"]}"}} '
        f"{classified['cost']}" in text
    )
    assert (
        f'sightline_model_compute_seconds_total{{device="cpu",kind="vision",model="{DETECTOR}"'
        in text
    )


async def test_tesseract_is_a_routed_version_whose_failures_count_against_it(
    database: Database, redis: Redis, key_prefix: str, tmp_path: Path
) -> None:
    """OCR by Tesseract goes through the router like the pool's models: a server without its
    language data fails the task with OCR_UNAVAILABLE, and the failure is counted against
    Tesseract's version (what a canary guard between two OCR engines compares)."""
    operations = ModelOperations(redis, KeySpace(key_prefix), LifecycleSettings(), Metrics())
    operations.start()
    engine = OcrEngine(tmp_path)  # no language data here
    service = vision(database, redis, key_prefix, Models(), ocr=engine)
    service.operations = operations
    principal = await new_principal(database)
    job = await service.analyze(principal, photo(), [VisionTask.OCR])
    events = await service.job_events(principal, job.id, None)
    failed = [e.data async for e in events if e.type == "VisionTaskFailed"]
    await stop(service)
    await operations.close()

    assert [(f["task"], f["code"]) for f in failed] == [("ocr", "OCR_UNAVAILABLE")]
    again = ModelOperations(redis, KeySpace(key_prefix), LifecycleSettings(), Metrics())
    figures = await again.stats.window("tesseract", engine.version, 60)
    assert (figures.requests, figures.errors) == (1, 1)
