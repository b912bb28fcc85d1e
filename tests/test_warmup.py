"""Startup warm-up: every default model loads and runs once in the background; `/readyz` and
`visionModels` say what is still warming and what failed; the first check pays no load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from httpx import ASGITransport, AsyncClient
from redis.asyncio import Redis

from backend.app import create_app
from backend.config import GuardrailSettings, ServerSettings, Settings, VisionSettings
from backend.core.db import Database
from backend.core.models import UserRole
from backend.knowledge.embeddings import Embedder, LocalEmbedder
from backend.services import Services
from tests.accounts import make_tenant, sign_in
from tests.conftest import GUARDRAIL_TIMEOUT_S, VISION_TIMEOUTS, lifespan, scaled
from tests.guardrails.test_service import principal_of

DENIED = "cooking recipes"
RAILS = GuardrailSettings(
    check_timeout_s=GUARDRAIL_TIMEOUT_S,
    policy={"topics": {"enabled": True, "denied": [DENIED]}},
)


class HeldEmbedder:
    """The session's MiniLM, whose warm-up waits until the test lets it go: what `/readyz`
    says while a model is warming is then certain, not a race with the load."""

    def __init__(self, inner: Embedder) -> None:
        self.name, self.dimensions = inner.name, inner.dimensions
        self.inner = inner
        self.go = asyncio.Event()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        await self.go.wait()
        return await self.inner.embed(texts)

    async def aclose(self) -> None:
        pass


@asynccontextmanager
async def started(
    settings: Settings, db: Database, redis: Redis, embedder: Embedder
) -> AsyncIterator[tuple[AsyncClient, Services]]:
    application = create_app(settings, db=db, redis=redis, embedder=embedder)
    async with lifespan(application) as manager:
        transport = ASGITransport(app=manager.app)
        async with AsyncClient(transport=transport, base_url="http://sightline.test") as http:
            yield http, manager._state["services"]


async def until_ready(http: AsyncClient) -> dict[str, Any]:
    async with asyncio.timeout(scaled(300)):
        while (response := await http.get("/readyz")).status_code != 200:
            assert response.json()["checks"]["models"] == "warming"
            await asyncio.sleep(0.2)
    return dict(response.json())


async def test_models_warm_in_the_background_and_one_that_fails_says_why(
    settings: Settings, db: Database, redis: Redis, embedder: LocalEmbedder, tmp_path: Path
) -> None:
    # an operator's model whose weights are not where its manifest says
    (tmp_path / "lost.json").write_text(
        json.dumps(
            {
                "name": "lost",
                "version": "1",
                "task": "classification",
                "runtime": "python",
                "loader": "tests.inference.toys:doubler",
                "weights": "weights/lost.bin",
                "sha256": "0" * 64,
                "input": {"warm": 0},
            }
        )
    )
    settings = settings.model_copy(
        update={
            "server": ServerSettings(warm_up=True),
            "vision": VisionSettings(enabled=True, models_dir=tmp_path, **VISION_TIMEOUTS),
            "guardrails": RAILS,
        }
    )
    held = HeldEmbedder(embedder)
    async with started(settings, db, redis, held) as (http, services):
        # the server answers at once; it is not ready while MiniLM is warming
        assert (await http.get("/healthz")).status_code == 200
        response = await http.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["checks"]["models"] == "warming"
        assert body["models"][embedder.name] == "warming"
        assert body["models"]["topic rail"] == "warming"  # it needs MiniLM

        held.go.set()
        body = await until_ready(http)
        models = body["models"]
        assert models.pop("lost") == "failed"
        assert body["checks"]["models"] == "degraded"  # the others serve
        assert set(models) >= {
            embedder.name,
            "injection classifier",
            "topic rail",
            "image rail",
            "tesseract",
            "efficientnet-lite0",
            "ssd-mobilenet-v2-coco",
            "haar-frontalface",
        }
        assert set(models.values()) == {"ready"}
        assert services.warm_up is not None
        assert "not found" in (services.warm_up.states()["lost"].error or "")

        tenant, (email,) = await make_tenant(services, UserRole.OWNER)
        account = await sign_in(http, tenant, email)
        query = "{ visionModels { name status error } }"
        served = await http.post("/graphql", json={"query": query}, headers=account.headers)
        listed = {m["name"]: m for m in served.json()["data"]["visionModels"]}
        assert listed["lost"]["status"] == "failed"
        assert "weights not found" in listed["lost"]["error"]
        assert listed["efficientnet-lite0"] == {
            "name": "efficientnet-lite0",
            "status": "ready",
            "error": None,
        }


async def test_the_first_topic_check_after_warm_up_loads_nothing(
    settings: Settings, db: Database, redis: Redis
) -> None:
    settings = settings.model_copy(
        update={"server": ServerSettings(warm_up=True), "guardrails": RAILS}
    )
    fresh = LocalEmbedder()  # not the session's: this one has loaded nothing yet
    try:
        assert fresh.worker_starts == 0
        async with started(settings, db, redis, fresh) as (http, services):
            body = await until_ready(http)
            assert body["models"]["topic rail"] == "ready"
            assert fresh.worker_starts == 1  # the warm-up loaded MiniLM
            assert services.guardrails is not None
            verdict = await services.guardrails.check_input(
                await principal_of(db), "What are good cooking recipes for pasta?", []
            )
            assert [d.rail for d in verdict.decisions] == ["topic"]
            assert fresh.worker_starts == 1  # the check loaded no model
    finally:
        await fresh.aclose()


async def test_readiness_need_not_wait_for_the_warm_up(
    settings: Settings, db: Database, redis: Redis, embedder: LocalEmbedder
) -> None:
    settings = settings.model_copy(
        update={"server": ServerSettings(warm_up=True, ready_after_warm_up=False)}
    )
    held = HeldEmbedder(embedder)
    async with started(settings, db, redis, held) as (http, services):
        response = await http.get("/readyz")
        assert response.status_code == 200
        assert response.json()["checks"]["models"] == "warming"
        assert response.json()["models"][embedder.name] == "warming"
        held.go.set()
        assert services.warm_up is not None
        await services.warm_up.wait()
        assert (await http.get("/readyz")).json()["models"][embedder.name] == "ready"
