"""The multi-replica topology: two `sightline serve` processes (replicas A and B) on the shared
Redis (a key prefix per test) and a private embedded PostgreSQL, with vision sent to one
`sightline inference serve` (SIGHTLINE_VISION_BACKEND=remote). Every process is owned by a
fixture and killed at teardown. The pieces are the fault suite's (tests/faults) and the inference
service's (tests/remote); this module only puts them together."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from backend.inference.manifest import ModelManifest, builtin_manifests
from tests.conftest import REDIS_URL, free_port, scaled
from tests.faults.conftest import (  # noqa: F401 (fixtures of this package too)
    account,
    database,
    gql,
    postgres,
    sign_in,
    stubs,
    until,
)
from tests.faults.servers import AppServer, PrivatePostgres, Stubs, server_environment, serving
from tests.remote.conftest import InferenceService

# The face cascade (fast on the CPU) as the service serves it, and twice more under operators'
# manifests whose batcher waits long for a full batch, so that what the tests need is certain
# without timing anything: `haar-pair` runs only when two requests are there (or after a minute);
# `haar-held` holds every request far longer than a test lasts (it is killed with them queued).
FACE = "haar-frontalface"
PAIR = "haar-pair"
HELD = "haar-held"
SERVED = (FACE, PAIR, HELD)


def _operators_manifests() -> list[ModelManifest]:
    [face] = [m for m in builtin_manifests() if m.name == FACE]
    return [
        dataclasses.replace(face, name=PAIR, max_batch=2, max_delay_ms=scaled(60) * 1000),
        dataclasses.replace(face, name=HELD, max_batch=64, max_delay_ms=scaled(600) * 1000),
    ]


@pytest.fixture(scope="package")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceService]:
    """The package's inference service (a test that kills it starts it again)."""
    if importlib.util.find_spec("pytriton") is None:
        pytest.skip("PyTriton is not installed (requirements-serve.txt)")
    folder = tmp_path_factory.mktemp("scale-serve")
    for manifest in _operators_manifests():
        (folder / f"{manifest.name}.json").write_text(json.dumps(manifest.to_dict()), "utf-8")
    service = InferenceService(
        free_port(),
        free_port(),
        free_port(),
        log=folder / "serve.log",
        models_dir=folder,
        models=SERVED,
    )
    service.start()
    try:
        yield service
    finally:
        service.kill()


@pytest.fixture
async def replicas(
    tmp_path: Path,
    postgres: PrivatePostgres,  # noqa: F811
    stubs: tuple[Stubs, str],  # noqa: F811
    key_prefix: str,
    redis: Redis,  # the shared Redis: this test's keys are deleted afterwards
    inference: InferenceService,
) -> AsyncIterator[tuple[AppServer, AppServer]]:
    """Replicas A and B, ready, once both see the served models ready; stopped at the end (a
    killed one stays dead). Answers are 60 words at 10 a second; a lost run is noticed within
    the lease (1 s) and its grace (3 s)."""
    if inference.process is None:  # an earlier test killed it and failed before restarting
        await asyncio.to_thread(inference.start)
    stub, url = stubs
    stub.llm.answer_tokens = 60
    environment = server_environment(
        database_url=postgres.url,
        redis_url=REDIS_URL,
        stubs_url=url,
        redis_key_prefix=key_prefix,
        vision_enabled="true",
        vision_backend="remote",
        vision_remote_url=inference.url,
        vision_models_dir=inference.models_dir,
        # longer than the pair's batcher waits; a dead service is retried, then a typed error
        vision_remote_call_timeout_s=scaled(180),
        vision_infer_timeout_s=scaled(240),
        vision_remote_breaker_reset_s=0.5,
        vision_job_lease_s=1,
        vision_job_lost_grace_s=3,
    )
    a = AppServer(tmp_path / "replica-a", environment)
    b = AppServer(tmp_path / "replica-b", environment)
    async with serving(a, b):
        yield a, b


VISION_MODELS = "{ visionModels { name status } }"


async def models_ready(server: AppServer, token: str) -> None:
    """Waits until the replica's client of the service sees every served model ready."""

    async def ready() -> bool:
        answer = await gql(server.http_url, token, VISION_MODELS)
        assert "errors" not in answer, answer
        status = {m["name"]: m["status"] for m in answer["data"]["visionModels"]}
        return all(status.get(name) == "ready" for name in SERVED)

    await until(ready, "the served models are ready on the replica")
