"""Running a model on a batch, inside a worker process. A loaded model is a function from a list
of inputs (numpy arrays) to a list of outputs, one per input."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from backend.inference.manifest import ManifestError, ModelManifest

BatchFn = Callable[[list[Any]], list[Any]]


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def out_of_memory(exc: BaseException) -> bool:
    """A GPU (or host) allocation failure: the batch can be split and tried again."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def resolve_device(device: str) -> str:
    """`auto`: the first GPU when torch sees one, else the CPU."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def load(manifest: ModelManifest, device: str, threads: int = 1) -> BatchFn:
    manifest.verify()
    device = (
        resolve_device(device) if manifest.runtime in ("torch", "torchscript", "onnx") else "cpu"
    )
    if manifest.runtime == "python":
        return _import(manifest.loader or "")(manifest)
    if manifest.runtime in ("torch", "torchscript"):
        return _torch(manifest, device, threads)
    if manifest.runtime == "onnx":
        return _onnx(manifest, device, threads)
    if manifest.runtime == "cascade":
        return _cascade(manifest)
    raise ManifestError(f"{manifest.name}: no runtime {manifest.runtime}")


def _torch(manifest: ModelManifest, device: str, threads: int) -> BatchFn:
    import torch

    torch.set_num_threads(threads)
    if manifest.runtime == "torchscript":
        model = torch.jit.load(manifest.weights, map_location=device)
    else:
        model = _import(manifest.loader or "")(manifest.weights)
    model = model.to(device).eval()
    images = int(manifest.input.get("size", 0)) > 0  # NCHW images: channels-last runs faster
    if images:
        model = model.to(memory_format=torch.channels_last)

    def run(batch: list[Any]) -> list[Any]:
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(batch)).to(device)
            if images:
                x = x.contiguous(memory_format=torch.channels_last)
            y = model(x)
        return list(y.float().cpu().numpy())

    return run


def _onnx(manifest: ModelManifest, device: str, threads: int) -> BatchFn:
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        manifest.weights, sess_options=options, providers=providers
    )
    name = session.get_inputs()[0].name

    def run(batch: list[Any]) -> list[Any]:
        [y] = session.run(None, {name: np.stack(batch)})[:1]
        return list(y)

    return run


def _cascade(manifest: ModelManifest) -> BatchFn:
    """OpenCV cascade detector: per image (grayscale uint8), boxes [x, y, w, h]."""
    import cv2

    detector = cv2.CascadeClassifier(manifest.weights)
    if detector.empty():
        raise ManifestError(f"{manifest.name}: cannot read cascade {manifest.weights}")
    min_size = int(manifest.input.get("min_size", 24))

    def run(batch: list[Any]) -> list[Any]:
        out = []
        for image in batch:
            boxes = detector.detectMultiScale(
                image, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size)
            )
            out.append(np.asarray(boxes, dtype=np.int32).reshape(-1, 4))
        return out

    return run
