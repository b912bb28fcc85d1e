"""The remote runtime against a real `sightline inference serve` (Triton through PyTriton, on
the CPU): the same pre- and post-processing as the local pool, the metadata check, a service
killed mid-request, and back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import urllib.request
from collections.abc import AsyncIterator

import numpy as np
import pytest
from skimage import data

from backend.inference import runtimes
from backend.inference.client import (
    InferenceError,
    ModelStatus,
    Overloaded,
    ServiceUnavailable,
    SignatureMismatch,
)
from backend.inference.manifest import load_manifests
from backend.inference.remote import RemoteInference
from backend.vision.preprocess import classification_input, detector_input
from tests.conftest import scaled
from tests.remote.conftest import MODELS, ROOT, InferenceService, one_queued

MANIFESTS = {m.name: m for m in [*load_manifests(None), one_queued()] if m.name in MODELS}


@pytest.fixture
async def remote(inference_service: InferenceService) -> AsyncIterator[RemoteInference]:
    async with warmed_client(inference_service.url) as client:
        yield client


@contextlib.asynccontextmanager
async def warmed_client(url: str, protocol: str = "http") -> AsyncIterator[RemoteInference]:
    """A remote client of every model of MANIFESTS, once each is ready; closed at the end."""
    client = RemoteInference(
        list(MANIFESTS.values()),
        url,
        protocol=protocol,
        call_timeout_s=scaled(30),
        retries=2,
        retry_backoff_s=0.05,
        breaker_failures=3,
        breaker_reset_s=0.5,
        ready_poll_s=0.2,
    )
    await client.start()
    try:
        async with asyncio.timeout(scaled(60)):
            for name in MANIFESTS:
                await client.warmed(name)
        yield client
    finally:
        await client.close()


async def test_classifies_as_the_local_runtime_does(remote: RemoteInference) -> None:
    manifest = MANIFESTS["efficientnet-lite0"]
    x = classification_input(data.chelsea(), manifest.input)
    [logits] = await remote.infer("efficientnet-lite0", [x], timeout_s=scaled(60))
    local = runtimes.load(manifest, "cpu", 1)
    [expected] = local([x])
    assert logits.shape == (len(manifest.labels),)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
    assert manifest.labels[int(np.argmax(logits))] in {"tabby", "Egyptian cat", "tiger cat"}


async def test_detects_with_the_requests_limits(remote: RemoteInference) -> None:
    face = MANIFESTS["haar-frontalface"]
    gray = detector_input(data.astronaut(), face.runtime, face.input)
    [rows] = await remote.infer("haar-frontalface", [gray], timeout_s=scaled(60))
    [expected] = runtimes.load(face, "cpu", 1)([gray])
    np.testing.assert_allclose(rows, expected, rtol=1e-5)
    assert len(rows) >= 1
    blank = np.full((64, 64), 128, np.uint8)
    [none] = await remote.infer("haar-frontalface", [blank], timeout_s=scaled(60))
    assert none.shape == (0, 6)

    ssd = MANIFESTS["ssd-mobilenet-v2-coco"]
    coffee = detector_input(data.coffee(), ssd.runtime, ssd.input)
    both = await remote.infer(
        "ssd-mobilenet-v2-coco",
        [
            {"image": coffee, "min_score": 0.3, "max_detections": 5},
            {"image": coffee, "min_score": 0.6, "max_detections": 1},
        ],
        timeout_s=scaled(60),
    )
    assert len(both[0]) >= len(both[1]) == 1
    assert ssd.labels[int(both[1][0][0])] == "cup"
    assert both[0].shape[1] == 6
    assert (both[0][:, 1] >= 0.3).all()


async def test_grpc_answers_as_http_does(
    inference_service: InferenceService, remote: RemoteInference
) -> None:
    """The same models through Triton's gRPC endpoint: checked against their manifests as over
    HTTP, with the same outputs (a classifier's logits, a detector's limited boxes)."""
    grpc_url = f"127.0.0.1:{inference_service.grpc_port}"
    async with warmed_client(grpc_url, protocol="grpc") as client:
        manifest = MANIFESTS["efficientnet-lite0"]
        x = classification_input(data.chelsea(), manifest.input)
        [over_grpc] = await client.infer("efficientnet-lite0", [x], timeout_s=scaled(60))
        [over_http] = await remote.infer("efficientnet-lite0", [x], timeout_s=scaled(60))
        np.testing.assert_allclose(over_grpc, over_http, rtol=1e-5, atol=1e-5)

        ssd = MANIFESTS["ssd-mobilenet-v2-coco"]
        coffee = detector_input(data.coffee(), ssd.runtime, ssd.input)
        item = {"image": coffee, "min_score": 0.6, "max_detections": 1}
        [boxes] = await client.infer("ssd-mobilenet-v2-coco", [item], timeout_s=scaled(60))
        [expected] = await remote.infer("ssd-mobilenet-v2-coco", [item], timeout_s=scaled(60))
        np.testing.assert_allclose(boxes, expected, rtol=1e-5, atol=1e-5)
        assert ssd.labels[int(boxes[0][0])] == "cup"


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match="protocol"):
        RemoteInference(list(MANIFESTS.values()), "127.0.0.1:8001", protocol="thrift")


async def test_a_model_whose_metadata_differs_never_serves(
    inference_service: InferenceService,
) -> None:
    # the manifest says 256 x 256 images; the service's model takes 224 x 224
    manifest = dataclasses.replace(
        MANIFESTS["efficientnet-lite0"],
        input={**MANIFESTS["efficientnet-lite0"].input, "size": 256},
    )
    client = RemoteInference([manifest], inference_service.url, ready_poll_s=0.2)
    await client.start()
    try:
        with pytest.raises(SignatureMismatch, match=r"input image has shape \[3, 224, 224\]"):
            async with asyncio.timeout(scaled(60)):
                await client.warmed(manifest.name)
        state = client.status()[manifest.name]
        assert state.status is ModelStatus.FAILED
        with pytest.raises(SignatureMismatch) as refused:
            await client.infer(manifest.name, [np.zeros((3, 256, 256), np.float32)])
        assert refused.value.code == "MODEL_SIGNATURE_MISMATCH"
    finally:
        await client.close()


async def test_beyond_the_models_queue_on_the_server_is_overloaded_not_a_failure(
    remote: RemoteInference,
) -> None:
    manifest = MANIFESTS["haar-one-queued"]
    gray = detector_input(data.astronaut(), manifest.runtime, manifest.input)
    outcomes = await asyncio.gather(
        *(remote.infer(manifest.name, [gray], timeout_s=scaled(60)) for _ in range(32)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert refused, "Triton queued more than the manifest's max_queue"
    assert all(isinstance(o, Overloaded) for o in refused), refused
    assert refused[0].code == "OVERLOADED"
    assert len(refused) < len(outcomes)  # the rest were served
    assert not remote.breaker.open  # a full queue is the service answering, not failing


async def test_a_service_killed_mid_request_gives_a_typed_error_then_serves_again(
    remote: RemoteInference, inference_service: InferenceService
) -> None:
    manifest = MANIFESTS["efficientnet-lite0"]
    x = classification_input(data.chelsea(), manifest.input)
    calls = [
        asyncio.ensure_future(remote.infer(manifest.name, [x], timeout_s=scaled(120)))
        for _ in range(48)
    ]
    await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
    inference_service.kill()  # -9 while the rest are queued or running
    outcomes = await asyncio.wait_for(
        asyncio.gather(*calls, return_exceptions=True), timeout=scaled(120)
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert failures, "the service was killed before any call failed"
    assert all(isinstance(f, ServiceUnavailable) for f in failures), failures
    assert failures[0].code == "INFERENCE_UNAVAILABLE"

    # the circuit is open: calls fail at once, typed, without reaching the network
    with pytest.raises(ServiceUnavailable):
        await remote.infer(manifest.name, [x], timeout_s=scaled(30))

    inference_service.start()
    # the same client, once its circuit lets a trial through: serving again
    deadline = asyncio.get_running_loop().time() + scaled(60)
    while True:
        try:
            [logits] = await remote.infer(manifest.name, [x], timeout_s=scaled(60))
            break
        except InferenceError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
    assert manifest.labels[int(np.argmax(logits))] in {"tabby", "Egyptian cat", "tiger cat"}
    assert not remote.breaker.open


NO_TORCH = """
import asyncio, sys
from skimage import data
import backend.app  # the API, as a replica with SIGHTLINE_VISION_BACKEND=remote imports it
from backend.inference.manifest import load_manifests
from backend.inference.remote import RemoteInference
from backend.vision.preprocess import classification_input

async def main():
    [manifest] = [m for m in load_manifests(None) if m.name == "efficientnet-lite0"]
    remote = RemoteInference([manifest], sys.argv[1])
    await remote.start()
    await asyncio.wait_for(remote.warmed(manifest.name), 120)
    x = classification_input(data.chelsea(), manifest.input)
    [logits] = await remote.infer(manifest.name, [x], timeout_s=120)
    await remote.close()
    print(manifest.labels[int(logits.argmax())], "torch" in sys.modules, sep="|")

asyncio.run(main())
"""


async def test_the_remote_path_loads_no_torch(inference_service: InferenceService) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        NO_TORCH,
        inference_service.url,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=scaled(180))
    assert process.returncode == 0, err.decode()[-3000:]
    label, torch_loaded = out.decode().strip().splitlines()[-1].split("|")
    assert label in {"tabby", "Egyptian cat", "tiger cat"}
    assert torch_loaded == "False"


def test_tritons_batcher_is_the_manifests(inference_service: InferenceService) -> None:
    for name in ("efficientnet-lite0", "haar-one-queued"):
        manifest = MANIFESTS[name]
        with urllib.request.urlopen(
            f"http://{inference_service.url}/v2/models/{name}/config", timeout=scaled(10)
        ) as answer:
            config = json.load(answer)
        batcher = config["dynamic_batching"]
        assert config["max_batch_size"] == manifest.max_batch
        assert batcher["max_queue_delay_microseconds"] == round(manifest.max_delay_ms * 1000)
        if manifest.preferred_batch:  # none: PyTriton's default
            assert batcher["preferred_batch_size"] == list(manifest.preferred_batch)
        assert int(batcher["default_queue_policy"]["max_queue_size"]) == manifest.max_queue
        assert batcher["priority_levels"] == 2  # live frames first


def test_the_inference_hpa_scales_on_a_metric_triton_exports(
    inference_service: InferenceService,
) -> None:
    """deploy/kubernetes's HPA scales the inference service on a gauge of Triton's metrics port
    (through prometheus-adapter): the served metrics have it, one series per model."""
    import yaml

    hpa = yaml.safe_load(
        (ROOT / "deploy/kubernetes/overlays/prod/inference-hpa.yaml").read_text("utf-8")
    )
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    with urllib.request.urlopen(
        f"http://127.0.0.1:{inference_service.metrics_port}/metrics", timeout=scaled(10)
    ) as answer:
        exposition = answer.read().decode()
    assert f"# TYPE {name} gauge" in exposition
    for model in MODELS:
        assert f'{name}{{model="{model}"' in exposition, model
