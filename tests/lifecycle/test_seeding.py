"""A server seeds the registry with what it serves: every model of its inference pool (vision
on), live with all the traffic, beside its chat aliases and its embedder."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from backend.config import Settings, VisionSettings
from backend.lifecycle.policy import ModelKind, VersionStatus
from backend.services import Services
from tests.conftest import VISION_TIMEOUTS


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.vision = VisionSettings(enabled=True, **VISION_TIMEOUTS)
    return settings


async def test_the_pool_models_are_registry_models(app: FastAPI, services: Services) -> None:
    assert services.inference is not None
    assert services.models_watcher is not None
    snapshot = services.models_watcher.snapshot
    served = {name: state.manifest for name, state in services.inference.status().items()}
    assert served  # the packaged models
    for name, manifest in served.items():
        [record] = snapshot.versions[name]
        assert (record.kind, record.task) == (ModelKind.VISION, manifest.task.value)
        assert (record.version, record.status) == (manifest.version, VersionStatus.LIVE)
        assert record.sha256 == manifest.sha256
        assert snapshot.policies[name].live == manifest.version
