"""How fast batches travel from the serving process to an inference worker, and how long the
event loop stands still meanwhile.

A model that only reads one value of each input (python runtime, no compute) is served by
`backend.inference.pool`; requests of `--batch` images (3 x `--size` x `--size` float32) are
kept in flight for `--seconds`. Printed: batches/s, MB/s of inputs, the serving process's CPU
time per batch (all its threads: the loop, the sender and reader threads), and the event loop's
longest stall (a ticker that sleeps 1 ms). `--slab-mb 0` sends through the pipe only; on a
version of the pool without the slab the option is ignored.

Usage: python bench/batch_transport.py [--batch 32] [--size 224] [--seconds 5] [--slab-mb 64]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from backend.inference.catalog import Task
from backend.inference.manifest import ModelManifest
from backend.inference.pool import InferencePool


def first_values(manifest: ModelManifest) -> Any:
    """The model: one value of each input (so the batch must have arrived whole)."""
    return lambda batch: [float(np.asarray(x).flat[-1]) for x in batch]


async def measure(args: argparse.Namespace) -> None:
    manifest = ModelManifest(
        name="read",
        version="1",
        task=Task.CLASSIFICATION,
        runtime="python",
        loader="batch_transport:first_values",
        input={"warm": 0},
        max_batch=args.batch,
        max_delay_ms=5.0,
        max_queue=args.batch * 8,
    )
    options: dict[str, Any] = {}
    if "slab_bytes" in inspect.signature(InferencePool).parameters:
        options["slab_bytes"] = int(args.slab_mb * 2**20)
    else:
        print("(this pool has no slab: the pipe, written on the event loop)")
    pool = InferencePool([manifest], **options)
    await pool.start()
    await pool.wait_ready(120)
    rng = np.random.default_rng(0)
    shape = (3, args.size, args.size)  # distinct arrays: pickle would send one repeated once
    images = [rng.standard_normal(shape).astype(np.float32) for _ in range(args.batch)]
    expected = [float(x.flat[-1]) for x in images]
    batches, stall = 0, 0.0

    async def client(deadline: float) -> None:
        nonlocal batches
        while time.perf_counter() < deadline:
            assert await pool.infer("read", images) == expected
            batches += 1

    async def ticker(deadline: float) -> None:
        nonlocal stall
        while time.perf_counter() < deadline:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stall = max(stall, time.perf_counter() - before - 0.001)

    await asyncio.gather(*(client(time.perf_counter() + 1) for _ in range(3)))  # warm-up
    batches, stall = 0, 0.0
    started, cpu = time.perf_counter(), time.process_time()
    deadline = started + args.seconds
    await asyncio.gather(ticker(deadline), *(client(deadline) for _ in range(3)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    await pool.close()
    megabytes = batches * sum(x.nbytes for x in images) / 2**20
    print(f"batch {args.batch} x 3x{args.size}x{args.size} float32, slab {args.slab_mb:g} MB")
    print(f"  batches/s              {batches / wall:>9.1f}")
    print(f"  MB/s to the worker     {megabytes / wall:>9.1f}")
    print(f"  serving CPU per batch  {1000 * cpu / max(batches, 1):>9.2f} ms")
    print(f"  longest loop stall     {1000 * stall:>9.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--slab-mb", type=float, default=64.0)
    asyncio.run(measure(parser.parse_args()))
