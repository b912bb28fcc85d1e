"""Startup warm-up: every default model loads and runs once in the background; `/readyz` and
`visionModels` say what is still warming and what failed; the first check pays no load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx import ASGITransport, AsyncClient
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.app import create_app
from backend.config import GuardrailSettings, ServerSettings, Settings, VisionSettings
from backend.core.db import Database
from backend.core.warmup import Warmth
from backend.knowledge.embeddings import Embedder, LocalEmbedder
from backend.services import Services
from tests.agents.test_runs import account, chat_settings, gql, llm, sign_in
from tests.conftest import (
    GUARDRAIL_TIMEOUT_S,
    VISION_TIMEOUTS,
    LiveServer,
    lifespan,
    scaled,
    serve_live,
)
from tests.guardrails.test_service import principal_of

__all__ = ["account", "chat_settings", "llm"]  # fixtures of the live-server tests

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


async def readyz(server: LiveServer, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """A live server's `/readyz` (its own connection pool: polling it is harmless), as soon as
    `until` holds."""
    async with asyncio.timeout(scaled(300)), httpx.AsyncClient(base_url=server.http_url) as http:
        while True:
            response = await http.get("/readyz", timeout=scaled(10))
            body = {"code": response.status_code, **response.json()}
            if until(body):
                return body
            await asyncio.sleep(0.2)


@pytest.mark.timeout(scaled(600))  # every default model loads: slow on a busy machine
async def test_models_warm_in_the_background_and_one_that_fails_says_why(
    chat_settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
    embedder: LocalEmbedder,
    tmp_path: Path,
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
    settings = chat_settings.model_copy(
        update={
            "server": ServerSettings(warm_up=True),
            "vision": VisionSettings(enabled=True, models_dir=tmp_path, **VISION_TIMEOUTS),
            "guardrails": RAILS,
        }
    )
    held = HeldEmbedder(embedder)
    async with serve_live(settings, embedder=held) as server:
        # the server answers at once; it is not ready while MiniLM is warming
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await http.get("/healthz")).status_code == 200
        body = await readyz(server, lambda body: body["checks"]["database"] == "ok")
        assert body["code"] == 503
        assert body["checks"]["models"] == "warming"
        assert body["models"][embedder.name] == "warming"
        assert body["models"]["topic rail"] == "warming"  # it needs MiniLM
        assert "error" not in json.dumps(body)  # why a model failed is not for anonymous callers

        held.go.set()
        body = await readyz(server, lambda body: body["code"] == 200)
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

        token = await sign_in(server, account)
        listed = {
            m["name"]: m
            for m in (await gql(server, token, "{ visionModels { name status error } }"))["data"][
                "visionModels"
            ]
        }
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
        async with started(settings, db, redis, fresh) as (_, services):
            assert services.warm_up is not None
            async with asyncio.timeout(scaled(300)):
                await services.warm_up.wait()
            assert services.warm_up.states()["topic rail"].status is Warmth.READY
            assert fresh.worker_starts == 1  # the warm-up loaded MiniLM
            assert services.guardrails is not None
            verdict = await services.guardrails.check_input(
                await principal_of(db), "What are good cooking recipes for pasta?", []
            )
            assert "topic" in [d.rail for d in verdict.decisions]
            assert fresh.worker_starts == 1  # the check loaded no model
    finally:
        await fresh.aclose()


async def test_readiness_need_not_wait_for_the_warm_up(
    settings: Settings, engine: AsyncEngine, embedder: LocalEmbedder
) -> None:
    settings = settings.model_copy(
        update={"server": ServerSettings(warm_up=True, ready_after_warm_up=False)}
    )
    held = HeldEmbedder(embedder)
    async with serve_live(settings, embedder=held) as server:
        body = await readyz(server, lambda body: body["checks"]["database"] == "ok")
        assert body["code"] == 200
        assert body["checks"]["models"] == "warming"
        assert body["models"][embedder.name] == "warming"
        held.go.set()
        body = await readyz(server, lambda body: body["checks"]["models"] != "warming")
        assert body["models"][embedder.name] == "ready"
