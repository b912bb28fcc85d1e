"""Startup warm-up: every default model loads and runs once in the background; `/readyz` and
`visionModels` say what is still warming and what failed; the first check pays no load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import GuardrailSettings, ServerSettings, Settings, VisionSettings
from backend.core.db import Database
from backend.core.warmup import Warmth, WarmUp
from backend.guardrails.engines import build_guardrails
from backend.knowledge.embeddings import Embedder, LocalEmbedder
from tests.agents.test_runs import account, chat_settings, gql, llm, sign_in
from tests.conftest import (
    GUARDRAIL_TIMEOUT_S,
    VISION_TIMEOUTS,
    LiveServer,
    scaled,
    serve_live,
)
from tests.guardrails.test_service import principal_of

__all__ = ["account", "chat_settings", "llm"]  # fixtures of the live-server tests

# Every test here waits for real models to load (a minute each on a busy machine).
pytestmark = pytest.mark.timeout(scaled(600))

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
            "toxicity classifier",
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


async def test_the_first_topic_check_after_warm_up_loads_nothing(db: Database) -> None:
    fresh = LocalEmbedder()  # not the session's: this one has loaded nothing yet
    rails = build_guardrails(db, RAILS, embedder=fresh)
    warm_up = WarmUp(scaled(600))
    try:
        principal = await principal_of(db)
        assert fresh.worker_starts == 0
        for name, step in rails.warm_ups().items():  # as the app starts them
            warm_up.start(name, step)
        await warm_up.wait()
        assert {n: s.status for n, s in warm_up.states().items()} == {
            "injection classifier": Warmth.READY,
            "toxicity classifier": Warmth.READY,
            "topic rail": Warmth.READY,
            "image rail": Warmth.READY,
        }
        assert fresh.worker_starts == 1  # the warm-up loaded MiniLM
        verdict = await rails.check_input(principal, "What are good cooking recipes for pasta?", [])
        assert "topic" in [d.rail for d in verdict.decisions]
        assert fresh.worker_starts == 1  # the check loaded no model
    finally:
        await warm_up.close()
        await rails.close()
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
