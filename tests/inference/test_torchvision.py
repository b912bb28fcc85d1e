"""The `torchvision` runtime end to end through the inference pool: architectures built by name
with random weights saved to a file (never a hub), detection and classification results, and
weights whose sha256 differs refused. Runs where requirements-gpu.txt is installed (CI:
.venv-gpu)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torchvision = pytest.importorskip(
    "torchvision",
    reason="no torchvision (pip install -r requirements-gpu.txt); CI runs these in .venv-gpu",
)

import torch  # noqa: E402

from backend.inference.catalog import Task  # noqa: E402
from backend.inference.client import ModelStatus, ModelUnavailable  # noqa: E402
from backend.inference.manifest import ModelManifest, coco_labels, load_manifests  # noqa: E402
from tests.inference import test_pool  # noqa: E402

pools = test_pool.pools  # the pool fixture of the other pool tests
LABELS = ("cat", "dog", "cup")


def random_weights(tmp_path: Path, architecture: str, **options: Any) -> tuple[str, str]:
    """A state dict of randomly initialised weights in a file, and its sha256."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(architecture, weights=None, **options)
    path = tmp_path / f"{architecture}.pt"
    torch.save(model.state_dict(), path)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_file(directory: Path, data: dict[str, Any]) -> ModelManifest:
    """Written as an operator would (a JSON file in the manifests directory), then loaded."""
    import json

    (directory / f"{data['name']}.json").write_text(json.dumps(data), "utf-8")
    [manifest] = [m for m in load_manifests(directory) if m.name == data["name"]]
    return manifest


@pytest.mark.parametrize(
    ("architecture", "options"),
    [
        (
            "fasterrcnn_mobilenet_v3_large_fpn",
            {"min_size": 320, "max_size": 320, "box_score_thresh": 0.0},
        ),
        ("ssdlite320_mobilenet_v3_large", {}),
    ],
)
async def test_a_detection_architecture_by_name(
    pools: Callable[..., Any], tmp_path: Path, architecture: str, options: dict[str, Any]
) -> None:
    labels = coco_labels()
    weights, sha256 = random_weights(
        tmp_path, architecture, weights_backbone=None, num_classes=len(labels), **options
    )
    manifest = manifest_file(
        tmp_path,
        {
            "name": "tv-detector",
            "version": "1",
            "task": "detection",
            "runtime": "torchvision",
            "weights": Path(weights).name,  # relative to the manifest's directory
            "sha256": sha256,
            "labels": list(labels),
            "input": {
                "architecture": architecture,
                "options": options,
                "width": 320,
                "height": 240,
                "iou": 0.5,
            },
        },
    )
    assert manifest.task is Task.DETECTION
    pool = await pools(manifest)
    assert pool.status()["tv-detector"].status is ModelStatus.READY
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(3)]
    requests = [{"image": image, "min_score": 0.0, "max_detections": 5} for image in images]
    found = await pool.infer("tv-detector", requests)  # one batch of three
    assert len(found) == 3
    for result in found:
        rows = np.asarray(result)
        assert rows.dtype == np.float32
        assert rows.ndim == 2
        assert rows.shape[1] == 6  # class id, score, x0, y0, x1, y1
        assert len(rows) <= 5
        assert np.all((rows[:, 2:] >= 0) & (rows[:, 2:] <= 1))  # fractions of the image
        assert np.all(rows[:, 2] <= rows[:, 4])
        assert np.all(rows[:, 3] <= rows[:, 5])
        assert np.all((rows[:, 0] >= 1) & (rows[:, 0] < len(labels)))  # no background
        assert np.all(np.diff(rows[:, 1]) <= 0)  # best first
    assert any(len(rows) for rows in found)  # random weights still propose boxes at score 0
    [none] = await pool.infer(
        "tv-detector", [{"image": images[0], "min_score": 1.01, "max_detections": 5}]
    )
    assert np.asarray(none).shape == (0, 6)


async def test_a_classification_architecture_by_name(
    pools: Callable[..., Any], tmp_path: Path
) -> None:
    weights, sha256 = random_weights(tmp_path, "resnet18", num_classes=len(LABELS))
    manifest = ModelManifest(
        name="tv-classifier",
        version="1",
        task=Task.CLASSIFICATION,
        runtime="torchvision",
        weights=weights,
        sha256=sha256,
        labels=LABELS,
        input={"architecture": "resnet18", "size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
    )
    pool = await pools(manifest)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((3, 64, 64)).astype(np.float32) for _ in range(4)]
    logits = await pool.infer("tv-classifier", inputs)
    assert [np.asarray(y).shape for y in logits] == [(len(LABELS),)] * 4
    assert all(np.all(np.isfinite(y)) for y in logits)
    assert not np.allclose(logits[0], logits[1])  # each image its own result


async def test_weights_whose_sha256_differs_are_not_served(
    pools: Callable[..., Any], tmp_path: Path
) -> None:
    weights, sha256 = random_weights(tmp_path, "resnet18", num_classes=len(LABELS))
    base = {
        "version": "1",
        "task": Task.CLASSIFICATION,
        "runtime": "torchvision",
        "weights": weights,
        "labels": LABELS,
        "input": {"architecture": "resnet18", "size": 32},
    }
    tampered = ModelManifest(name="tampered", sha256="0" * 64, **base)
    unknown = ModelManifest(
        name="unknown-architecture",
        sha256=sha256,
        **{**base, "input": {"architecture": "resnet_from_the_hub", "size": 32}},
    )
    good = ModelManifest(name="good", sha256=sha256, **base)
    pool = await pools(tampered, unknown, good)
    assert pool.status()["good"].status is ModelStatus.READY  # the others serve
    state = pool.status()["tampered"]
    assert state.status is ModelStatus.FAILED
    assert "do not match their sha256" in (state.error or "")
    with pytest.raises(ModelUnavailable, match="sha256"):
        await pool.infer("tampered", [np.zeros((3, 32, 32), dtype=np.float32)])
    state = pool.status()["unknown-architecture"]
    assert state.status is ModelStatus.FAILED
    assert "no torchvision classification architecture 'resnet_from_the_hub'" in (state.error or "")
    assert "resnet50" in (state.error or "")  # it names what is available
