"""Vision through two replicas and one inference service: Triton batches the replicas' requests
together, and a service killed with requests in its batch queue costs their callers a typed error
(never a hang); started again on its port, it serves the same replicas, not restarted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from skimage import data

from tests.conftest import scaled
from tests.faults.conftest import Watcher, sign_in, until
from tests.faults.servers import AppServer
from tests.remote.conftest import InferenceService
from tests.scale.conftest import FACE, HELD, PAIR, models_ready
from tests.vision.test_graphql import EVENTS, jpeg, upload

pytestmark = [pytest.mark.scale, pytest.mark.timeout(900)]

ASTRONAUT = jpeg(data.astronaut())


async def detect(server: AppServer, token: str, detector: str) -> Watcher:
    """Sends a face detection to a replica; the client reading its job's events."""
    sent = await upload(server, token, ASTRONAUT, ["DETECT"], detector=detector)  # type: ignore[arg-type]
    assert "errors" not in sent, sent
    job = sent["data"]["analyzeImage"]["id"]
    return Watcher(server.ws_url, token, EVENTS, {"id": job}, "visionJobEvents")


def outcome(watcher: Watcher) -> dict[str, Any]:
    """The detection's result or failure event."""
    [done] = [e for e in watcher.events if e["__typename"].startswith("VisionTask")]
    return done


async def signed_in(replicas: tuple[AppServer, AppServer], account: dict[str, Any]) -> str:
    token = await sign_in(replicas[0].http_url, account)  # good on either replica
    await asyncio.gather(*(models_ready(server, token) for server in replicas))
    return token


async def test_requests_from_both_replicas_are_batched_together(
    replicas: tuple[AppServer, AppServer], account: dict[str, Any], inference: InferenceService
) -> None:
    token = await signed_in(replicas, account)
    requests = inference.metric("nv_inference_request_success", PAIR)
    batches = inference.metric("nv_inference_exec_count", PAIR)
    # one request through each replica: the pair's batcher runs them only together (or alone
    # after a minute: then this fails, it does not hang)
    watchers = await asyncio.gather(*(detect(server, token, PAIR) for server in replicas))
    for watcher in watchers:
        last = await watcher.ended()
        assert last["__typename"] == "VisionJobCompleted", watcher.events
        done = outcome(watcher)
        assert done["__typename"] == "VisionTaskCompleted", done
        assert [o["label"] for o in done["result"]["objects"][:1]] == ["face"]
    assert inference.metric("nv_inference_request_success", PAIR) - requests == 2
    assert inference.metric("nv_inference_exec_count", PAIR) - batches == 1  # a batch of two


async def test_a_service_killed_mid_batch_fails_its_callers_typed_then_serves_again(
    replicas: tuple[AppServer, AppServer], account: dict[str, Any], inference: InferenceService
) -> None:
    token = await signed_in(replicas, account)
    # two requests through each replica, held in the batch queue of `haar-held`
    watchers = [await detect(server, token, HELD) for server in replicas for _ in range(2)]
    await until(
        lambda: inference.metric("nv_inference_pending_request_count", HELD) >= 4,
        "the four requests wait in Triton's batch queue",
    )
    inference.kill()  # -9, the whole group, its batch queue with it

    # Every caller gets an end: its task failed with a typed code (or was retried and served).
    for watcher in watchers:
        last = await watcher.ended()
        assert last["__typename"] in {"VisionJobCompleted", "VisionJobFailed"}, watcher.events
        done = outcome(watcher)
        if done["__typename"] == "VisionTaskFailed":
            assert done["code"] == "INFERENCE_UNAVAILABLE", done
    assert any(outcome(w)["__typename"] == "VisionTaskFailed" for w in watchers)
    for server in replicas:  # the API was not restarted
        assert server.alive()

    await asyncio.to_thread(inference.start)  # the same ports
    for server in replicas:
        # a client retries a failed request; once the replica's circuit lets calls through,
        # it is served (within the patience, never by restarting anything)
        async with asyncio.timeout(scaled(180)):
            while True:
                watcher = await detect(server, token, FACE)
                await watcher.ended()
                if outcome(watcher)["__typename"] == "VisionTaskCompleted":
                    break
                assert outcome(watcher)["code"] in {"INFERENCE_UNAVAILABLE", "MODEL_UNAVAILABLE"}
                await asyncio.sleep(0.5)
        assert [o["label"] for o in outcome(watcher)["result"]["objects"][:1]] == ["face"]
