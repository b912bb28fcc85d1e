"""Drift on a live server: chat turns through the LLM stub fill a version's reference with short
prompts, then long prompts move its current window past the threshold; `modelDrift` shows it to
admins only, the crossing is audited and counted, and an operator's pinned window becomes the
reference. Dark images through the vision service drift from bright ones. Drift off records
nothing."""

from __future__ import annotations

import asyncio
import io
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import DriftSettings, LifecycleSettings, LimitsSettings, Settings
from backend.core.db import Database
from backend.core.metrics import Metrics
from backend.core.models import UserRole
from backend.core.redis import KeySpace
from backend.inference.pool import InferencePool
from backend.lifecycle.drift import DriftRecorder, DriftSamples
from backend.lifecycle.drift_watch import DriftWatch, compare, threshold_of
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.router import ModelRouter
from backend.services import Services
from backend.vision.service import VisionTask
from tests.accounts import committed_tenant
from tests.agents.test_agent import events_of
from tests.agents.test_runs import (  # noqa: F401
    PASSWORD,
    chat_settings,
    gql,
    llm,
    start_run,
)
from tests.conftest import LiveServer, scaled, serve_live
from tests.knowledge.test_service import database, new_principal
from tests.vision.test_recovery import stop, vision
from tests.vision.test_versions import MODEL, classifier

__all__ = ["database"]  # fixture

DRIFT = """
query ($model: String!, $version: String) {
  modelDrift(model: $model, version: $version, last: 10) {
    model version
    reference { pinned requests since until }
    current { at requests exceeded signals { name direction statistic value threshold exceeded } }
    history { at exceeded }
  }
}"""
PIN = """
mutation ($model: String!, $version: String!, $since: DateTime!, $until: DateTime!) {
  pinDriftReference(model: $model, version: $version, since: $since, until: $until) {
    pinned requests since until
  }
}"""
UNPIN = """
mutation ($model: String!, $version: String!) {
  unpinDriftReference(model: $model, version: $version) { pinned requests }
}"""


@pytest.fixture
async def people(chat_settings: Settings, engine: AsyncEngine) -> dict[str, str]:  # noqa: F811
    """A committed tenant (the platform's operators) with an owner and a member."""
    tenant = await committed_tenant(
        chat_settings,
        engine,
        "Drift",
        [("o@drift.example", UserRole.OWNER), ("m@drift.example", UserRole.MEMBER)],
        PASSWORD,
    )
    return {"tenant": tenant.slug}


@pytest.fixture
def drift_settings(chat_settings: Settings, people: dict[str, str]) -> Settings:  # noqa: F811
    # compared when the test says (check()), not in the background
    chat_settings.drift = DriftSettings(
        reference_size=8, window_size=8, min_samples=4, interval_s=3600.0
    )
    chat_settings.limits = LimitsSettings(enabled=False)  # 16 turns in a few seconds
    chat_settings.privacy = chat_settings.privacy.model_copy(
        update={"operator_tenant": people["tenant"]}
    )
    return chat_settings


async def _token(server: LiveServer, tenant: str, email: str) -> str:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=scaled(30)) as http:
        response = await http.post(
            "/oauth/token",
            data={
                "grant_type": "password",
                "tenant": tenant,
                "username": email,
                "password": PASSWORD,
            },
        )
    return response.json()["access_token"]


async def _turn(server: LiveServer, token: str, content: str) -> None:
    _, run = await start_run(server, token, content)
    events = await events_of(server, token, run)
    assert events[-1]["__typename"] == "RunCompleted"


def _signal(body: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [s for s in body["current"]["signals"] if s["name"] == name]
    return found


@pytest.mark.timeout(scaled(600))
async def test_long_prompts_after_short_ones_drift_past_the_threshold(
    drift_settings: Settings, engine: AsyncEngine, people: dict[str, str]
) -> None:
    async with serve_live(drift_settings) as server:
        services: Services = server.state["services"]
        assert services.lifecycle is not None
        watch = services.lifecycle.drift_watch
        assert watch is not None
        owner = await _token(server, people["tenant"], "o@drift.example")
        member = await _token(server, people["tenant"], "m@drift.example")

        for i in range(8):  # the reference: short questions
            await _turn(server, owner, f"hi {i}")
        await watch.samples.flush()
        [(model, version)] = await watch.samples.versions()
        found = await watch.check()
        assert not any(s.exceeded for s in found[(model, version)])  # the same sample twice

        middle = datetime.now(UTC)
        for i in range(8):  # the current window: long ones
            await _turn(server, owner, f"question {i}: " + "tell me about refunds " * 20)
        await watch.samples.flush()
        await watch.check()

        body = await gql(server, owner, DRIFT, model=model)
        assert "errors" not in body, body
        drift = body["data"]["modelDrift"]
        assert (drift["model"], drift["version"]) == (model, version)  # the live version
        assert drift["reference"]["pinned"] is False
        assert drift["reference"]["requests"] == 8
        assert drift["reference"]["until"] is not None  # full
        prompt = _signal(drift, "prompt_length")
        assert prompt["direction"] == "input"
        assert prompt["statistic"] == "psi"
        assert prompt["threshold"] == 0.2
        assert prompt["exceeded"]
        assert prompt["value"] > 0.2
        assert _signal(drift, "refusal")["exceeded"] is False  # the stub never refuses
        assert drift["current"]["exceeded"] is True
        assert [h["exceeded"] for h in drift["history"]] == [False, True]

        # a member may not read it; an admin who is not an operator may not pin (below)
        refused = await gql(server, member, DRIFT, model=model)
        assert refused["data"] is None
        assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"

        # bad input is a typed error
        for variables, expected in (
            ({"model": "no-such-model"}, "MODEL_NOT_FOUND"),
            ({"model": "m" * 200, "version": "1"}, "BAD_USER_INPUT"),
        ):
            bad = await gql(server, owner, DRIFT, **variables)
            assert bad["errors"][0]["extensions"]["code"] == expected, bad
        too_many = await gql(
            server,
            owner,
            "query ($m: String!) { modelDrift(model: $m, last: 0) { model } }",
            m=model,
        )
        assert too_many["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

        async with httpx.AsyncClient(base_url=server.http_url) as http:
            exposition = (await http.get("/metrics")).text
        labels = f'model="{model}",signal="prompt_length",version="{version}"'
        assert f"sightline_model_drift_exceeded_total{{{labels}}} 1.0" in exposition
        assert f"sightline_model_drift_threshold{{{labels}}} 0.2" in exposition
        assert 'signal="prompt_length",statistic="ks"' in exposition

        # the operator pins the long prompts' window: the current window matches it again
        pinned = await gql(
            server,
            owner,
            PIN,
            model=model,
            version=version,
            since=middle.isoformat(),
            until=datetime.now(UTC).isoformat(),
        )
        assert "errors" not in pinned, pinned
        assert pinned["data"]["pinDriftReference"]["pinned"] is True
        assert pinned["data"]["pinDriftReference"]["requests"] == 8
        await watch.check()
        again = (await gql(server, owner, DRIFT, model=model))["data"]["modelDrift"]
        assert again["reference"]["pinned"] is True
        assert _signal(again, "prompt_length")["exceeded"] is False

        empty = await gql(
            server,
            owner,
            PIN,
            model=model,
            version=version,
            since="2001-01-01T00:00:00Z",
            until="2001-01-02T00:00:00Z",
        )
        assert empty["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        backwards = await gql(
            server,
            owner,
            PIN,
            model=model,
            version=version,
            since=datetime.now(UTC).isoformat(),
            until=middle.isoformat(),
        )
        assert backwards["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        unpinned = await gql(server, owner, UNPIN, model=model, version=version)
        assert unpinned["data"]["unpinDriftReference"] == {"pinned": False, "requests": 8}
        member_pin = await gql(server, member, UNPIN, model=model, version=version)
        assert member_pin["errors"][0]["extensions"]["code"] == "FORBIDDEN"

    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT event, outcome, details FROM audit_events "
                    "WHERE event LIKE 'model.drift%' AND details->>'model' = :m "
                    "ORDER BY created_at"
                ),
                {"m": model},
            )
        ).all()
    events = [(r.event, r.outcome, r.details.get("signal")) for r in rows]
    assert ("model.drift_exceeded", "failure", "prompt_length") in events
    assert [e[0] for e in events][-2:] == [
        "model.drift_reference_pinned",
        "model.drift_reference_unpinned",
    ]


async def test_drift_off_records_nothing(redis: Redis, key_prefix: str, db: Database) -> None:
    off = ModelOperations(
        redis,
        KeySpace(key_prefix),
        LifecycleSettings(),
        Metrics(),
        drift=DriftSettings(enabled=False),
        db=db,
    )
    assert off.drift is None
    assert off.drift_watch is None


async def test_dark_images_after_bright_ones_drift_and_the_recorder_is_bounded(
    redis: Redis, key_prefix: str
) -> None:
    settings = DriftSettings(reference_size=20, window_size=20, min_samples=10, max_pending=100)
    recorder = DriftRecorder(settings)
    samples = DriftSamples(redis, KeySpace(key_prefix), settings, recorder)
    rng = np.random.default_rng(1)
    for brightness in [200] * 20 + [40] * 20:
        image = rng.normal(brightness, 10, (48, 64, 3)).clip(0, 255).astype("uint8")
        recorder.image("effnet", "1", image)
        recorder.vision_result("effnet", "1", {"classes": [{"label": "cat", "score": 0.9}]})
        if recorder.dropped == 0:
            await samples.flush()
    windows = await samples.windows("effnet", "1")
    assert len(windows["image_brightness"].reference) == 20
    assert [round(s.value) for s in windows["image_aspect"].current[:1]] == [1]  # 64 / 48
    signals = {s.name: s for s in compare(settings, windows)}
    assert signals["image_brightness"].exceeded
    assert signals["image_brightness"].figures["ks"] == 1.0  # no overlap at all
    assert not signals["image_pixels"].exceeded  # the same size throughout
    assert not signals["class"].exceeded

    for _ in range(30):  # 120 samples without a flush: the 20 past max_pending are dropped
        recorder.image("effnet", "1", image)
    assert recorder.dropped == 20
    assert sum(len(v) for v in recorder.take().values()) == 100


def _png(brightness: int) -> bytes:
    pixels = np.random.default_rng(brightness).normal(brightness, 8, (40, 60, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(buffer, "PNG")
    return buffer.getvalue()


async def test_dark_images_through_the_vision_service_drift_from_bright_ones(
    database: Database, redis: Redis, key_prefix: str
) -> None:
    pool = InferencePool([classifier("1", top=0)])
    await pool.start()
    service = vision(database, redis, key_prefix, pool, ModelRouter.over(pool), classifier=MODEL)
    settings = DriftSettings(reference_size=6, window_size=6, min_samples=4)
    operations = ModelOperations(
        redis, KeySpace(key_prefix), LifecycleSettings(), Metrics(), drift=settings, db=database
    )
    service.operations = operations
    service.start()
    try:
        await pool.wait_ready()
        principal = await new_principal(database)
        for brightness in [220] * 6 + [30] * 6:
            job = await service.analyze(principal, _png(brightness), [VisionTask.CLASSIFY])
            events = await service.job_events(principal, job.id, None)
            async with asyncio.timeout(scaled(60)), aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    if event.terminal:
                        break
        assert operations.drift_watch is not None
        await operations.drift_watch.samples.flush()
        windows = await operations.drift_watch.samples.windows(MODEL, "1")
    finally:
        await stop(service)
        await pool.close()
    signals = {s.name: s for s in compare(settings, windows)}
    assert signals["image_brightness"].exceeded
    assert signals["image_brightness"].figures["ks"] == 1.0  # every dark one below every bright one
    assert not signals["image_pixels"].exceeded  # 60 x 40 throughout
    assert not signals["image_aspect"].exceeded
    assert not signals["class"].exceeded  # the toy always answers "one"


async def test_one_replica_compares_and_a_version_whose_samples_expired_is_forgotten(
    redis: Redis, key_prefix: str, db: Database
) -> None:
    settings = DriftSettings(reference_size=4, window_size=4, min_samples=2)
    keys = KeySpace(key_prefix)

    def replica() -> DriftWatch:
        samples = DriftSamples(redis, keys, settings, DriftRecorder(settings))
        return DriftWatch(
            samples, db=db, redis=redis, keys=keys, settings=settings, metrics=Metrics()
        )

    first, second = replica(), replica()
    for length in [10.0, 20.0, 30.0, 40.0] * 2:
        first.samples.recorder.add("assistant", "1", "answer_length", length)
    await first.samples.flush()
    [answer] = (await first.check())[("assistant", "1")]
    assert (answer.name, answer.value, answer.exceeded) == ("answer_length", 0.0, False)
    assert await second.check() == {}  # the first holds the turn while it lives

    async for key in redis.scan_iter(match=f"{key_prefix}drift:assistant:1:*"):
        await redis.delete(key)  # what their expiry does
    assert await first.check() == {("assistant", "1"): []}
    assert await first.samples.versions() == []


def test_a_signal_may_have_its_own_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGHTLINE_DRIFT_THRESHOLDS", '{"answer_length": 0.3}')
    monkeypatch.setenv("SIGHTLINE_DRIFT_ENABLED", "0")
    settings = DriftSettings()
    assert settings.enabled is False
    assert threshold_of(settings, "answer_length") == 0.3
    assert threshold_of(settings, "class") == 0.2  # SIGHTLINE_DRIFT_PSI_THRESHOLD
    assert threshold_of(settings, "query_embedding") == 0.1  # ..._CENTROID_THRESHOLD
    with pytest.raises(ValueError, match="above 0: refusal"):
        DriftSettings(thresholds={"refusal": 0})
