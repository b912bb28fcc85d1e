"""The API with SIGHTLINE_VISION_BACKEND=remote: every vision task goes to the inference service
(no local pool), through the same GraphQL upload and result stream as with the pool."""

from __future__ import annotations

import asyncio
from typing import Any

from skimage import data
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import Settings
from backend.inference.remote import RemoteInference
from tests.agents.test_runs import sign_in
from tests.conftest import scaled, serve_live
from tests.remote.conftest import InferenceService
from tests.vision.test_graphql import analyse, jpeg, vision_on


async def test_the_api_sends_vision_tasks_to_the_inference_service(
    chat_settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
    inference_service: InferenceService,
) -> None:
    settings = vision_on(chat_settings, backend="remote", remote_url=inference_service.url)
    async with serve_live(settings) as server:
        remote = server.services.inference
        assert isinstance(remote, RemoteInference)
        async with asyncio.timeout(scaled(60)):
            for model in ("efficientnet-lite0", "ssd-mobilenet-v2-coco", "haar-frontalface"):
                await remote.warmed(model)
        token = await sign_in(server, account)

        cat = await analyse(server, token, jpeg(data.chelsea()), ["CLASSIFY", "DETECT"])
        by_task = {e["task"]: e for e in cat if e["__typename"] == "VisionTaskCompleted"}
        assert cat[-1]["__typename"] == "VisionJobCompleted"
        classes = [c["label"] for c in by_task["classify"]["result"]["classes"]]
        assert classes[0] in {"tabby", "Egyptian cat", "tiger cat"}
        assert by_task["classify"]["model"] == "efficientnet-lite0"
        cats = [o for o in by_task["detect"]["result"]["objects"] if o["label"] == "cat"]
        assert cats
        assert cats[0]["score"] >= 0.5

        # the face cascade, asked for by name: the same answer as the local pool's test gets
        faces = await analyse(
            server, token, jpeg(data.astronaut()), ["DETECT"], detector="haar-frontalface"
        )
        [found] = [e["result"]["objects"] for e in faces if e.get("task") == "detect"]
        assert [o["label"] for o in found[:1]] == ["face"]
        assert 150 < found[0]["box"]["x"] + found[0]["box"]["width"] / 2 < 300
        served = remote.status()
        assert served["efficientnet-lite0"].items >= 1
        assert served["haar-frontalface"].items >= 1
