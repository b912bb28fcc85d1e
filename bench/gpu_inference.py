"""The inference pool on a GPU against the raw model, at the same batch size, in the same run.

Needs only torch, torchvision and numpy (the GPU image has no web stack). A model with random
weights (throughput does not depend on them) is served by `backend.inference.pool` on `--device`
with batches of `--batch`, kept full by enough concurrent single-image requests; the same model
is then called directly in a loop on batches of the same size, its outputs brought back to the
host as the pool does. Printed: images/s of both and their ratio (goal: the pool within 15% of
the raw model).

Models (`--model`, several separated by commas):
- `resnet50`: a torchvision ResNet-50 built by a `torch` runtime loader (224 x 224 inputs).
- `tv-resnet50`, `tv-fasterrcnn_mobilenet_v3_large_fpn`, `tv-ssdlite320_mobilenet_v3_large`: the
  `torchvision` manifest runtime (backend/inference/torchvision_runtime.py), its weights a state
  dict in a file with its sha256, as an operator would ship them; detectors take 320 x 320 RGB
  images and answer boxes after the runtime's score threshold and NMS on the device.
- `tiny`: a small net, torch only, to try the script where torchvision is missing.

Usage: python bench/gpu_inference.py [--device cuda] [--batch 32] [--seconds 20] [--model ...]
  [--slab-mb 64] [--in-flight 1]  (the pool's transport: see backend/inference/_transport.py)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from backend.inference.catalog import Task
from backend.inference.manifest import ModelManifest, coco_labels
from backend.inference.pool import InferencePool

SIZE = 224


def resnet50(weights: str | None) -> object:
    """The model the workers build (weights stay random)."""
    import torchvision

    return torchvision.models.resnet50(weights=None)


def tiny(weights: str | None) -> object:
    """A small convolutional net, torch only: to try the script where torchvision is missing."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )


MODELS = {"resnet50": resnet50, "tiny": tiny}
TORCHVISION = {  # the torchvision runtime's architectures: (task, builder options)
    "tv-resnet50": (Task.CLASSIFICATION, {}),
    "tv-fasterrcnn_mobilenet_v3_large_fpn": (
        Task.DETECTION,
        {"min_size": 320, "max_size": 320, "weights_backbone": None},
    ),
    "tv-ssdlite320_mobilenet_v3_large": (Task.DETECTION, {"weights_backbone": None}),
}
DETECTION_SIZE = 320
MIN_SCORE = 0.3


def _architecture(name: str) -> str:
    return name.removeprefix("tv-")


def _torchvision_model(name: str) -> tuple[Any, ModelManifest]:
    """The architecture with random weights, and the manifest serving them from a file."""
    import torch
    import torchvision

    task, options = TORCHVISION[name]
    labels = coco_labels() if task is Task.DETECTION else tuple(f"class-{i}" for i in range(1000))
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        _architecture(name), weights=None, num_classes=len(labels), **options
    )
    path = Path(tempfile.mkdtemp(prefix="gpu-bench-")) / f"{_architecture(name)}.pt"
    torch.save(model.state_dict(), path)
    manifest = ModelManifest(
        name=name,
        version="random",
        task=task,
        runtime="torchvision",
        weights=str(path),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        labels=labels,
        input={
            "architecture": _architecture(name),
            "options": {k: v for k, v in options.items() if k != "weights_backbone"},
            "size": SIZE,
            "iou": 0.5,
        },
    )
    return model, manifest


def _input(name: str) -> Any:
    rng = np.random.default_rng(0)
    if name in TORCHVISION and TORCHVISION[name][0] is Task.DETECTION:
        image = rng.integers(0, 256, (DETECTION_SIZE, DETECTION_SIZE, 3), dtype=np.uint8)
        return {"image": image, "min_score": MIN_SCORE, "max_detections": 100}
    return rng.standard_normal((3, SIZE, SIZE)).astype(np.float32)


def raw(device: str, batch: int, seconds: float, name: str) -> float:
    import torch

    if name in TORCHVISION and TORCHVISION[name][0] is Task.DETECTION:
        return _raw_detector(device, batch, seconds, name)
    if name in TORCHVISION:
        model = _torchvision_model(name)[0].to(device).eval()
    else:
        model = MODELS[name](None).to(device).eval().to(memory_format=torch.channels_last)  # type: ignore[attr-defined]
    x = torch.randn(batch, 3, SIZE, SIZE, device=device).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started, images = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            y = model(x).float().cpu()  # the pool also brings results back to the host
            images += batch
        del y
        return images / (time.perf_counter() - started)


def _raw_detector(device: str, batch: int, seconds: float, name: str) -> float:
    """The detector called directly on lists of images, with the same score cut and NMS."""
    import torch
    import torchvision

    model = _torchvision_model(name)[0].to(device).eval()
    image = _input(name)["image"]

    def once() -> None:
        images = [
            torch.from_numpy(image).to(device).permute(2, 0, 1).float().div_(255.0)
            for _ in range(batch)
        ]
        for found in model(images):
            keep = found["scores"] >= MIN_SCORE
            boxes, scores, labels = (found[k][keep] for k in ("boxes", "scores", "labels"))
            keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)[:100]
            torch.cat([labels[keep, None].float(), scores[keep, None], boxes[keep]], 1).cpu()

    with torch.inference_mode():
        for _ in range(3):
            once()
        started, images = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            once()
            images += batch
        return images / (time.perf_counter() - started)


def _manifest(name: str, batch: int) -> ModelManifest:
    batching = {
        "max_batch": batch,
        "preferred_batch": (batch,),
        "max_delay_ms": 20.0,
        "max_queue": batch * 16,
    }
    if name in TORCHVISION:
        manifest = _torchvision_model(name)[1]
        return dataclasses.replace(manifest, **batching)
    return ModelManifest(
        name=name,
        version="random",
        task=Task.CLASSIFICATION,
        runtime="torch",
        loader=f"gpu_inference:{name}",
        input={"size": SIZE},
        **batching,
    )


async def pooled(
    device: str, batch: int, seconds: float, threads: int, name: str, transport: dict[str, Any]
) -> float:
    manifest = _manifest(name, batch)
    pool = InferencePool([manifest], workers=1, device=device, threads=threads, **transport)
    await pool.start()
    await pool.wait_ready(600)
    if pool.status()[name].error:
        raise SystemExit(f"{name} did not load: {pool.status()[name].error}")
    image = _input(name)
    done = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await pool.infer(name, [image])
            done += 1

    await asyncio.gather(*(client() for _ in range(batch * 3)))  # a warm-up round
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(client() for _ in range(batch * 3)))
    rate = done / (time.perf_counter() - started)
    await pool.close()
    return rate


def main(args: argparse.Namespace) -> None:
    import torch

    device = args.device
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    transport = {"slab_bytes": int(args.slab_mb * 2**20), "in_flight": args.in_flight}
    print(
        f"torch {torch.__version__} on {device} ({gpu}), batch {args.batch}, {args.seconds:g} s, "
        f"slab {args.slab_mb:g} MB, {args.in_flight} batch(es) in flight per worker"
    )
    for name in args.model.split(","):
        pool_rate = asyncio.run(
            pooled(device, args.batch, args.seconds, args.threads, name, transport)
        )
        raw_rate = raw(device, args.batch, args.seconds, name)
        print(f"{name}")
        print(f"  raw model in a loop   {raw_rate:>9.1f} images/s")
        print(f"  inference pool        {pool_rate:>9.1f} images/s")
        print(f"  pool / raw            {pool_rate / raw_rate:>9.2f}  (goal >= 0.85)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--slab-mb", type=float, default=64.0, help="shared memory per batch (0: the pipe)"
    )
    parser.add_argument("--in-flight", type=int, default=1, help="batches a worker holds")
    parser.add_argument(
        "--model",
        default="resnet50",
        help="comma-separated, of: " + ", ".join(sorted([*MODELS, *TORCHVISION])),
    )
    main(parser.parse_args())
