"""Tiny models for the pool's tests (python runtime), loaded inside the worker processes.
Each output carries the size of the batch it ran in, so tests can see the batching."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from backend.inference.manifest import ModelManifest

Batch = Callable[[list[Any]], list[Any]]


def doubler(manifest: ModelManifest) -> Batch:
    return lambda batch: [(int(x) * 2, len(batch)) for x in batch]


def slow(manifest: ModelManifest) -> Batch:
    def run(batch: list[Any]) -> list[Any]:
        time.sleep(float(manifest.input.get("seconds", 0.2)))
        return [(int(x), len(batch)) for x in batch]

    return run


def crasher(manifest: ModelManifest) -> Batch:
    def run(batch: list[Any]) -> list[Any]:
        if any(int(x) < 0 for x in batch):
            os._exit(3)  # the worker process dies mid-batch
        return [(int(x), len(batch)) for x in batch]

    return run


def greedy(manifest: ModelManifest) -> Batch:
    """Out of memory on batches over two items, and on the item 13 whatever its batch."""

    def run(batch: list[Any]) -> list[Any]:
        if len(batch) > 2 or any(int(x) == 13 for x in batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [(int(x), len(batch)) for x in batch]

    return run


def broken(manifest: ModelManifest) -> Batch:
    raise RuntimeError("weights are corrupt")


def picky(manifest: ModelManifest) -> Batch:
    """Raises on the item 13 (an image it cannot read), whatever else is in its batch."""

    def run(batch: list[Any]) -> list[Any]:
        if any(int(x) == 13 for x in batch):
            raise ValueError("cannot read item 13")
        return [(int(x), len(batch), os.getpid()) for x in batch]

    return run


def versioned(manifest: ModelManifest) -> Batch:
    """Answers with the version that ran (after `load_s` of loading, and `seconds` a batch);
    a negative item kills the worker."""
    time.sleep(float(manifest.input.get("load_s", 0)))

    def run(batch: list[Any]) -> list[Any]:
        if any(int(x) < 0 for x in batch):
            os._exit(3)
        time.sleep(float(manifest.input.get("seconds", 0)))
        return [(int(x), manifest.version, len(batch)) for x in batch]

    return run


def top_class(manifest: ModelManifest) -> Batch:
    """A classifier whose logits put `input.top` first: each version answers its own class."""
    top = int(manifest.input.get("top", 0))

    def run(batch: list[Any]) -> list[Any]:
        logits = np.zeros(len(manifest.labels) or 2, dtype=np.float32)
        logits[top] = 5.0
        return [logits.copy() for _ in batch]

    return run


def checksum(manifest: ModelManifest) -> Batch:
    """Per array: its sum, dtype and shape, whether its batch came as views of one stacked
    array (the shared-memory slab's), and the worker's pid; an array whose first value is -1
    kills the worker mid-batch."""

    def run(batch: list[Any]) -> list[Any]:
        arrays = [np.asarray(x["image"] if isinstance(x, dict) else x) for x in batch]
        if any(a.size and a.flat[0] == -1 for a in arrays):
            os._exit(3)
        via_slab = hasattr(batch, "array")
        return [
            {
                "sum": float(a.astype(np.float64).sum()),
                "dtype": str(a.dtype),
                "shape": a.shape,
                "via_slab": via_slab,
                "pid": os.getpid(),
            }
            for a in arrays
        ]

    return run


def dies_loading(manifest: ModelManifest) -> Batch:
    """A model whose load kills the worker, every time."""
    os._exit(3)
