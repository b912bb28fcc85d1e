"""The `torchvision` runtime: a torchvision detection or classification architecture built by
name, with no weights of its own (`weights=None`, `weights_backbone=None`: nothing comes from a
hub), and its weights loaded from the manifest's file (a state dict, checked against the
manifest's sha256 before it loads). For GPU nodes: `pip install -r requirements-gpu.txt`.

torchvision is imported here only, when such a model loads: the default install has CPU torch
without torchvision (it cannot import beside the CPU wheel torch==2.13.0).

A manifest names the architecture in `input.architecture` (e.g. `resnet50`,
`fasterrcnn_mobilenet_v3_large_fpn`, `ssdlite320_mobilenet_v3_large`); `num_classes` is
`input.num_classes`, else the number of labels; `input.options` are further keyword arguments
of the builder (e.g. `{"min_size": 320}` for a Faster R-CNN).

- Classification (task `classification`): the input is a CHW float32 image already resized and
  normalised (as for the `torch` runtime); the output, per image, the logits.
- Detection (task `detection`): the input is the detectors' (an RGB uint8 image, or a dict
  {"image", "min_score", "max_detections"}); the images go to the model as one list (it
  normalises and resizes them itself), then per image on the model's device: the request's
  score threshold, `torchvision.ops.batched_nms` per class (`input.iou`), the request's maximum.
  The output per image is the detectors' rows [class id, score, x0, y0, x1, y1], the corners as
  fractions of the image (the vision service turns them into pixels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from backend.inference._transport import stacked
from backend.inference.catalog import Task
from backend.inference.manifest import ManifestError, ModelManifest

BatchFn = Callable[[list[Any]], list[Any]]
# runtimes.py's reading of a detector's item: (image, min_score, max_detections)
RequestFn = Callable[[Any, dict[str, Any]], tuple[np.ndarray, float, int]]
COLUMNS = 6  # class id, score, x0, y0, x1, y1


def load(manifest: ModelManifest, device: str, threads: int, request: RequestFn) -> BatchFn:
    try:
        import torch
        import torchvision
    except (
        ImportError,
        RuntimeError,
    ) as exc:  # RuntimeError: a torchvision built for another torch
        raise ManifestError(
            f"{manifest.name}: the torchvision runtime needs torchvision "
            f"(pip install -r requirements-gpu.txt): {type(exc).__name__}: {exc}"
        ) from exc

    torch.set_num_threads(threads)
    model = _build(manifest, torchvision)
    try:
        state = torch.load(manifest.weights or "", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise ManifestError(f"{manifest.name}: cannot load its weights: {exc}") from exc
    model = model.to(device).eval()
    if manifest.task == Task.DETECTION:
        return _detector(manifest, model, device, request)
    return _classifier(model, device, torch)


def _build(manifest: ModelManifest, torchvision: Any) -> Any:
    name = str(manifest.input.get("architecture") or "")
    detection = manifest.task == Task.DETECTION
    module = torchvision.models.detection if detection else torchvision.models
    available = torchvision.models.list_models(module=module)
    if name not in available:
        raise ManifestError(
            f"{manifest.name}: no torchvision {manifest.task.value} architecture {name!r} "
            f"(available: {', '.join(available)})"
        )
    num_classes = int(manifest.input.get("num_classes") or len(manifest.labels) or 0)
    if num_classes < 1:
        raise ManifestError(f"{manifest.name}: give input.num_classes or the labels")
    options = dict(manifest.input.get("options") or {})
    if detection:
        options["weights_backbone"] = None
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{manifest.name}: cannot build {name}: {exc}") from exc


def _classifier(model: Any, device: str, torch: Any) -> BatchFn:
    def run(batch: list[Any]) -> list[Any]:
        with torch.inference_mode():
            x = torch.from_numpy(stacked(batch).astype(np.float32, copy=False)).to(device)
            y = model(x)
        return list(y.float().cpu().numpy())

    return run


def _detector(
    manifest: ModelManifest,
    model: Any,
    device: str,
    request: RequestFn,
) -> BatchFn:
    import torch
    import torchvision

    spec = manifest.input
    iou = float(spec.get("iou", 0.5))
    nms = torchvision.ops.batched_nms

    def select(found: dict[str, Any], width: int, height: int, min_score: float, most: int) -> Any:
        boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
        keep = scores >= min_score
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if most < 1 or not len(scores):
            return np.zeros((0, COLUMNS), dtype=np.float32)
        keep = nms(boxes, scores, labels, iou)[:most]  # sorted by score, on the model's device
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=device)
        corners = (boxes[keep] / scale).clamp(0.0, 1.0)
        rows = torch.cat([labels[keep, None].to(boxes.dtype), scores[keep, None], corners], dim=1)
        return rows.float().cpu().numpy()

    def run(batch: list[Any]) -> list[Any]:
        requests = [request(item, spec) for item in batch]
        with torch.inference_mode():
            images = [
                torch.from_numpy(np.ascontiguousarray(image))
                .to(device)
                .permute(2, 0, 1)
                .float()
                .div_(255.0)
                for image, _, _ in requests
            ]
            outputs = model(images)
            return [
                select(found, image.shape[1], image.shape[0], min_score, most)
                for found, (image, min_score, most) in zip(outputs, requests, strict=True)
            ]

    return run
