"""The inference pool with real worker processes: batching, priorities, bounded queues,
cancellation, out-of-memory splitting, crashed workers, failed loads, and the packaged models."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from backend.core.metrics import Metrics
from backend.inference.catalog import Task
from backend.inference.client import (
    InferenceError,
    ModelStatus,
    ModelUnavailable,
    OutOfMemory,
    Overloaded,
    Priority,
    WorkerLost,
)
from backend.inference.manifest import ModelManifest, builtin_manifests
from backend.inference.pool import InferencePool
from tests.conftest import scaled


def toy(name: str, loader: str, **options: Any) -> ModelManifest:
    return ModelManifest(
        name=name,
        version="1",
        task=Task.CLASSIFICATION,
        runtime="python",
        loader=f"tests.inference.toys:{loader}",
        input={"warm": 0, **options.pop("input", {})},
        **options,
    )


# where the pool's models run: `cuda` on a GPU node (bench/gpu_run.sh runs the torchvision tests so)
DEVICE = os.environ.get("SIGHTLINE_TEST_INFERENCE_DEVICE", "cpu")


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., Any]]:
    started: list[InferencePool] = []

    async def start(
        *manifests: ModelManifest, workers: int = 1, metrics: Metrics | None = None
    ) -> InferencePool:
        pool = InferencePool(manifests, workers=workers, metrics=metrics, device=DEVICE)
        await pool.start()
        started.append(pool)
        await pool.wait_ready()
        return pool

    yield start
    for pool in started:
        await pool.close()


async def test_concurrent_requests_share_a_batch(pools: Callable[..., Any]) -> None:
    pool = await pools(toy("double", "doubler", max_batch=8, max_delay_ms=200))
    results = await asyncio.gather(*(pool.infer("double", [i]) for i in range(8)))
    assert [r[0][0] for r in results] == [i * 2 for i in range(8)]
    assert {r[0][1] for r in results} == {8}  # one batch of eight
    state = pool.status()["double"]
    assert state.status is ModelStatus.READY
    assert state.batches == 1


async def test_preferred_sizes_and_the_delay_bound(pools: Callable[..., Any]) -> None:
    pool = await pools(
        toy("double", "doubler", max_batch=8, max_delay_ms=30, preferred_batch=(1, 4))
    )
    results = await asyncio.gather(*(pool.infer("double", [i]) for i in range(6)))
    assert sorted(r[0][1] for r in results) == [1, 1, 4, 4, 4, 4]  # 4 then 1 then 1


async def test_a_full_queue_refuses_at_once(pools: Callable[..., Any]) -> None:
    metrics = Metrics()
    pool = await pools(toy("slow", "slow", max_batch=1, max_queue=3), metrics=metrics)
    first = asyncio.create_task(pool.infer("slow", [1, 2, 3]))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded):
        await pool.infer("slow", [4, 5, 6])
    assert [r[0] for r in await first] == [1, 2, 3]
    labels = {"model": "slow", "version": "1"}
    sample = metrics.registry.get_sample_value
    assert sample("sightline_inference_rejected_total", labels) == 1
    assert sample("sightline_inference_queue_capacity", labels) == 3


async def test_a_cancelled_request_leaves_its_batch(pools: Callable[..., Any]) -> None:
    pool = await pools(toy("slow", "slow", max_batch=4, max_delay_ms=0))
    running = asyncio.create_task(pool.infer("slow", [1]))  # occupies the only worker
    await asyncio.sleep(0.05)
    dropped = asyncio.create_task(pool.infer("slow", [2]))
    kept = asyncio.create_task(pool.infer("slow", [3]))
    await asyncio.sleep(0.01)
    dropped.cancel()
    assert (await kept)[0] == (3, 1)  # it ran alone: the cancelled item was not in its batch
    await running
    with pytest.raises(asyncio.CancelledError):
        await dropped


async def test_live_frames_go_first(pools: Callable[..., Any]) -> None:
    pool = await pools(toy("slow", "slow", max_batch=1, max_delay_ms=0, input={"seconds": 0.1}))
    order: list[str] = []

    async def call(name: str, priority: Priority) -> None:
        await pool.infer("slow", [1], priority=priority)
        order.append(name)

    tasks = [asyncio.create_task(call(f"job{i}", Priority.BATCH)) for i in range(3)]
    await asyncio.sleep(0.02)
    tasks.append(asyncio.create_task(call("frame", Priority.LIVE)))
    await asyncio.gather(*tasks)
    assert order.index("frame") <= 1  # behind at most the job already running


async def test_out_of_memory_splits_the_batch(pools: Callable[..., Any]) -> None:
    pool = await pools(toy("greedy", "greedy", max_batch=8, max_delay_ms=100))
    results = await asyncio.gather(
        *(pool.infer("greedy", [i]) for i in (1, 2, 3, 4, 13, 5)), return_exceptions=True
    )
    assert isinstance(results[4], OutOfMemory)  # only the item that fails alone fails
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert [r[0][0] for r in ok] == [1, 2, 3, 4, 5]
    assert all(r[0][1] <= 2 for r in ok)


async def test_an_item_that_raises_fails_alone(pools: Callable[..., Any]) -> None:
    pool = await pools(toy("picky", "picky", max_batch=8, max_delay_ms=200))
    inputs = (1, 2, 13, 3, 4)
    results = await asyncio.gather(
        *(pool.infer("picky", [i]) for i in inputs), return_exceptions=True
    )
    failed = results[2]
    assert type(failed) is InferenceError  # not WorkerLost, nor any other kind
    assert failed.code == "INFERENCE_FAILED"
    assert "cannot read item 13" in str(failed)
    ok = [r[0] for r in results if not isinstance(r, BaseException)]
    assert [value for value, _, _ in ok] == [1, 2, 3, 4]  # its batch-mates, each run alone
    state = pool.status()["picky"]
    assert state.batches == 1  # they were one batch
    # the same worker process serves the next batch
    [(value, _, pid)] = await pool.infer("picky", [5])
    assert value == 5
    assert {p for _, _, p in ok} == {pid}


async def test_a_dead_worker_fails_its_batch_and_is_replaced(pools: Callable[..., Any]) -> None:
    metrics = Metrics()
    pool = await pools(toy("crash", "crasher", max_batch=1), metrics=metrics)
    with pytest.raises(WorkerLost):
        await pool.infer("crash", [-1])
    assert (await pool.infer("crash", [7], timeout_s=60))[0] == (7, 1)
    sample = metrics.registry.get_sample_value
    assert sample("sightline_inference_worker_restarts_total") == 1
    assert sample("sightline_inference_workers") == 1
    assert sample("sightline_inference_workers_busy") == 0


async def test_models_that_fail_to_load_are_unavailable(pools: Callable[..., Any]) -> None:
    pool = await pools(toy("broken", "broken"), toy("double", "doubler"))
    assert (await pool.infer("double", [2]))[0][0] == 4
    with pytest.raises(ModelUnavailable, match="weights are corrupt"):
        await pool.infer("broken", [1])
    with pytest.raises(ModelUnavailable):
        await pool.infer("nonexistent", [1])


async def test_a_model_that_kills_every_worker_fails_once_restarts_are_spent() -> None:
    """No worker is left to load it: waiting for it ends with the reason, not a timeout."""
    pool = InferencePool([toy("fatal", "dies_loading")], workers=1, device=DEVICE, max_restarts=2)
    await pool.start()
    try:
        await pool.wait_ready(scaled(120))  # returns: failed, not waiting out the timeout
        state = pool.status()["fatal"]
        assert state.status is ModelStatus.FAILED
        assert "no inference worker is left" in (state.error or "")
        with pytest.raises(ModelUnavailable, match="no inference worker is left"):
            await pool.warmed("fatal")
    finally:
        await pool.close()


async def test_the_packaged_classifier_and_face_detector(pools: Callable[..., Any]) -> None:
    from skimage import data

    manifests = {m.name: m for m in builtin_manifests()}
    pool = await pools(manifests["efficientnet-lite0"], manifests["haar-frontalface"])
    cat = np.asarray(data.chelsea(), dtype=np.float32)[::2, ::2]  # about 150 x 225
    side = 224
    crop = np.zeros((side, side, 3), dtype=np.float32)
    crop[: cat.shape[0], : min(cat.shape[1], side)] = cat[:, :side]
    spec = manifests["efficientnet-lite0"].input
    x = ((crop / 255.0 - spec["mean"]) / spec["std"]).transpose(2, 0, 1).astype(np.float32)
    [logits] = await pool.infer("efficientnet-lite0", [x])
    labels = manifests["efficientnet-lite0"].labels
    top5 = [labels[i] for i in np.argsort(logits)[::-1][:5]]
    assert {"tabby", "Egyptian cat", "tiger cat"} & set(top5)

    gray = np.asarray(data.astronaut()).mean(axis=2).astype(np.uint8)
    [faces] = await pool.infer("haar-frontalface", [gray])
    [(label, score, x0, _y0, x1, y1)] = faces  # [class, score, corners as fractions]
    assert label == 0
    assert 0.5 < score <= 1
    assert 0.3 < (x0 + x1) / 2 < 0.6
    assert y1 < 0.4


async def test_the_packaged_coco_detector_runs_batches(pools: Callable[..., Any]) -> None:
    import cv2
    from skimage import data

    manifest = {m.name: m for m in builtin_manifests()}["ssd-mobilenet-v2-coco"]
    assert manifest.sha256
    assert manifest.config_sha256
    pool = await pools(manifest)
    photos = {"person": data.astronaut(), "cup": data.coffee(), "cat": data.chelsea()}
    images = [cv2.resize(np.asarray(p), (300, 300)) for p in photos.values()]
    found = await pool.infer("ssd-mobilenet-v2-coco", images)  # one batch of three
    assert pool.status()["ssd-mobilenet-v2-coco"].batches == 1
    for label, rows in zip(photos, found, strict=True):
        best = rows[0]
        assert manifest.labels[int(best[0])] == label
        assert best[1] >= 0.5
        assert np.all((rows[:, 2:] >= 0) & (rows[:, 2:] <= 1))
    # a request's own limits: at most one box, of score 0.9 or more
    [rows] = await pool.infer(
        "ssd-mobilenet-v2-coco", [{"image": images[1], "min_score": 0.9, "max_detections": 1}]
    )
    assert len(rows) == 1
    assert manifest.labels[int(rows[0][0])] == "cup"


async def test_weights_that_fail_their_sha256_are_not_served(
    pools: Callable[..., Any], tmp_path: Any
) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"not the weights the manifest names")
    tampered = toy("tampered", "doubler", weights=str(weights), sha256="0" * 64)
    pool = await pools(tampered, toy("double", "doubler"))
    assert (await pool.infer("double", [2]))[0][0] == 4  # the others serve
    state = pool.status()["tampered"]
    assert state.status is ModelStatus.FAILED
    assert "do not match their sha256" in (state.error or "")
    with pytest.raises(ModelUnavailable, match="sha256"):
        await pool.infer("tampered", [1])


async def test_a_dnn_graph_that_is_no_ssd_detector_is_not_served(
    pools: Callable[..., Any], tmp_path: Any
) -> None:
    graph = tmp_path / "pool.prototxt"  # a Caffe graph without weights: one max-pooling layer
    graph.write_text(
        'name: "pool" input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
        'layer { name: "p" type: "Pooling" bottom: "data" top: "p"\n'
        "  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n"
    )
    manifest = ModelManifest(
        name="pooling",
        version="1",
        task=Task.DETECTION,
        runtime="opencv-dnn",
        weights=str(graph),
        input={"width": 8, "height": 8},
    )
    pool = await pools(manifest, toy("double", "doubler"))
    assert (await pool.infer("double", [3]))[0][0] == 6
    state = pool.status()["pooling"]
    assert state.status is ModelStatus.FAILED
    assert "not SSD's DetectionOutput" in (state.error or "")
