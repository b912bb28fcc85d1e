"""The inference pool on a GPU against the raw model, at the same batch size, in the same run.

Needs only torch, torchvision and numpy (the GPU image has no web stack): a torchvision ResNet-50
(random weights: throughput does not depend on them) is served by `backend.inference.pool` on
`--device` with batches of `--batch`, kept full by enough concurrent single-image requests; the
same model is then called directly in a loop on batches of the same size. Printed: images/s of
both and their ratio (goal: the pool within 15% of the raw model).

Usage: python bench/gpu_inference.py [--device cuda] [--batch 32] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from backend.inference.catalog import Task
from backend.inference.manifest import ModelManifest
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


def raw(device: str, batch: int, seconds: float, name: str) -> float:
    import torch

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


async def pooled(device: str, batch: int, seconds: float, threads: int, name: str) -> float:
    manifest = ModelManifest(
        name=name,
        version="random",
        task=Task.CLASSIFICATION,
        runtime="torch",
        loader=f"gpu_inference:{name}",
        input={"size": SIZE},
        max_batch=batch,
        preferred_batch=(batch,),
        max_delay_ms=20.0,
        max_queue=batch * 16,
    )
    pool = InferencePool([manifest], workers=1, device=device, threads=threads)
    await pool.start()
    await pool.wait_ready(600)
    image = np.random.default_rng(0).standard_normal((3, SIZE, SIZE)).astype(np.float32)
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

    print(f"torch {torch.__version__}, {args.model} on {args.device}, batch {args.batch}")
    pool_rate = asyncio.run(pooled(args.device, args.batch, args.seconds, args.threads, args.model))
    raw_rate = raw(args.device, args.batch, args.seconds, args.model)
    print(f"  raw model in a loop   {raw_rate:>9.1f} images/s")
    print(f"  inference pool        {pool_rate:>9.1f} images/s")
    print(f"  pool / raw            {pool_rate / raw_rate:>9.2f}  (goal >= 0.85)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    main(parser.parse_args())
