"""Hot-swapping a model version under load: throughput and latency during the swaps against
steady state, in the same run.

Closed-loop clients classify the whole time through the inference pool, each request routed as
the vision service routes it (`ModelRouter` + `run_routed`: the registry's policy, then a second
route when a version retires under it). First a steady phase on version 1; then `--swaps` swaps,
each: the next version is added (loaded and warmed in every worker, off their serving thread),
the policy switches to it, and the previous one is drained and unloaded. Requests that complete
while a swap is under way count for the swap phase. Printed side by side: requests, failures,
throughput and latency p50/p99 of both phases, the ratio of the p99s (goal: 0 failed requests,
p99 during the swap at most 1.5x steady state), and the load average.

Models: `toy` (numpy only: a matrix product per item, and `--load-s` of CPU work to load, like a
real model's load competing for the cores) or `efficientnet-lite0` (the packaged classifier).

Usage: python bench/model_swap.py [--model toy] [--workers 2] [--clients 8] [--seconds 6]
       [--swaps 3] [--load-s 1.5] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from backend.inference.catalog import Task
from backend.inference.manifest import ModelManifest, builtin_manifests
from backend.inference.pool import InferencePool
from backend.lifecycle.policy import (
    Arm,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    RequestKey,
    TrafficPolicy,
    VersionStatus,
)
from backend.lifecycle.router import ModelRouter, run_routed

TOY_SIDE = 96  # a 96 x 96 matrix product per item: about 0.1-0.3 ms of CPU
# a swap's two parts: the new version loads and warms (no traffic yet), then the policy
# switches and the old version drains; a request that ends in the next phase counts for its own
_SWAP_PART = {"loading": "loading", "switching": "switching"}


def toy(manifest: ModelManifest) -> Callable[[list[Any]], list[Any]]:
    """The toy classifier the workers build: `load_s` of CPU work first (a model's load)."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((TOY_SIDE, TOY_SIDE)).astype(np.float32)
    deadline = time.process_time() + float(manifest.input.get("load_s", 0))
    while time.process_time() < deadline:
        weights = np.tanh(weights @ weights.T / TOY_SIDE).astype(np.float32)
    repeat = int(manifest.input.get("repeat", 20))

    def run(batch: list[Any]) -> list[Any]:
        out = []
        for x in batch:
            y = np.asarray(x, dtype=np.float32).reshape(TOY_SIDE, -1)[:, :TOY_SIDE]
            for _ in range(repeat):
                y = np.tanh(y @ weights)
            out.append(y[0, :10].copy())
        return out

    return run


def manifest_of(model: str, version: int, load_s: float) -> ModelManifest:
    if model == "toy":
        return ModelManifest(
            name="toy",
            version=str(version),
            task=Task.CLASSIFICATION,
            runtime="python",
            loader="bench.model_swap:toy",
            input={"load_s": load_s, "warm": np.zeros(TOY_SIDE * TOY_SIDE).tolist()},
            max_batch=8,
            max_delay_ms=2.0,
        )
    packaged = {m.name: m for m in builtin_manifests()}
    if model not in packaged:
        raise SystemExit(f"no packaged model {model!r} here (installed: {', '.join(packaged)})")
    base = packaged[model].to_dict()
    return ModelManifest.from_dict({**base, "version": f"{base['version']}+{version}"})


def request_input(model: str, manifest: ModelManifest) -> Any:
    if model == "toy":
        return np.random.default_rng(1).standard_normal(TOY_SIDE * TOY_SIDE).astype(np.float32)
    size = int(manifest.input.get("size", 224))
    return np.random.default_rng(1).standard_normal((3, size, size)).astype(np.float32)


def policy(model: str, live: str, revision: int) -> RegistrySnapshot:
    record = ModelVersionRecord(model, live, ModelKind.VISION, "classification", VersionStatus.LIVE)
    return RegistrySnapshot(
        {model: (record,)},
        {model: TrafficPolicy(model, (Arm(live, 100),), revision=revision)},
        revision=revision,
    )


class Load:
    """Closed-loop clients; each completed request is recorded with its phase."""

    def __init__(self, pool: InferencePool, router: ModelRouter, model: str, x: Any) -> None:
        self.phase = "warm-up"
        self.latencies: dict[str, list[float]] = {}
        self.failures: dict[str, list[str]] = {}
        self.mismatched = 0  # answered by another version than the one routed (never)
        self.windows: dict[str, float] = {}  # seconds spent in each phase
        self._since = time.perf_counter()
        self._stop = asyncio.Event()
        self._pool, self._router, self._model, self._x = pool, router, model, x
        self._ids = itertools.count()

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        spent = now - self._since
        self.windows[self.phase] = self.windows.get(self.phase, 0.0) + spent
        if self.phase in ("loading", "switching"):
            self.windows["swap"] = self.windows.get("swap", 0.0) + spent
        self.phase, self._since = phase, now

    async def client(self, user: int) -> None:
        while not self._stop.is_set():
            key = RequestKey(tenant_id="bench", user_id=f"u{user}", request_id=str(next(self._ids)))
            started = time.perf_counter()
            phase = self.phase
            try:
                await run_routed(
                    self._router,
                    self._model,
                    key,
                    None,
                    lambda v: self._pool.infer(self._model, [self._x], version=v, timeout_s=60),
                )
            except Exception as exc:
                self.failures.setdefault(phase, []).append(f"{type(exc).__name__}: {exc}")
                continue
            # a request that straddled a boundary counts for the swap's part it met
            ended = self.phase if self.phase == phase else _SWAP_PART.get(phase, self.phase)
            elapsed = time.perf_counter() - started
            self.latencies.setdefault(ended, []).append(elapsed)
            if ended in ("loading", "switching"):
                self.latencies.setdefault("swap", []).append(elapsed)

    async def run(self, clients: int) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.client(i)) for i in range(clients)]

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        self.enter("done")
        self._stop.set()
        await asyncio.gather(*tasks)


async def main(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    first = manifest_of(args.model, 1, args.load_s)
    pool = InferencePool([first], workers=args.workers, device=args.device, threads=args.threads)
    await pool.start()
    await pool.wait_ready(600)
    await pool.add(first)  # every worker has it (start waits for one)
    model = first.name
    router = ModelRouter.over(pool)
    revision = 1
    router.apply(policy(model, first.version, revision))
    load = Load(pool, router, model, request_input(args.model, first))
    tasks = await load.run(args.clients)
    await asyncio.sleep(1.0)
    load.enter("steady")
    await asyncio.sleep(args.seconds)
    live = first
    swap_times = []
    for n in range(2, args.swaps + 2):
        load.enter("loading")
        started = time.perf_counter()
        new = manifest_of(args.model, n, args.load_s)
        await pool.add(new, timeout_s=600)
        load.enter("switching")  # READY everywhere: the policy switches, the old one drains
        revision += 1
        router.apply(policy(model, new.version, revision))  # the policy switches at once
        pool.set_default(model, new.version)
        await pool.remove(model, live.version, grace_s=30)
        swap_times.append(time.perf_counter() - started)
        live = new
        load.enter("steady")
        await asyncio.sleep(args.seconds / args.swaps)
    await load.stop(tasks)
    held = await pool.worker_models()
    await pool.close()
    load_after = os.getloadavg()

    toy_load = f"; the toy loads in {args.load_s} CPU-seconds" if args.model == "toy" else ""
    print(
        f"model {args.model}, {args.workers} workers x {args.threads} threads on {args.device}, "
        f"{args.clients} clients, {args.swaps} swaps ({', '.join(f'{s:.2f}' for s in swap_times)}"
        f" s each{toy_load})"
    )
    print(f"{'phase':<8} {'requests':>9} {'failed':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    p99 = {}
    for phase in ("steady", "swap", "loading", "switching"):
        latencies = np.asarray(load.latencies.get(phase, [0.0])) * 1000
        failed = len(load.failures.get(phase, []))
        rate = len(latencies) / max(load.windows.get(phase, 1e-9), 1e-9)
        p99[phase] = float(np.percentile(latencies, 99))
        print(
            f"{phase:<8} {len(latencies):>9} {failed:>7} {rate:>8.0f} "
            f"{np.percentile(latencies, 50):>8.2f} {p99[phase]:>8.2f}"
        )
    steady = max(p99["steady"], 1e-9)
    print(
        f"p99 during swaps / steady state: {p99['swap'] / steady:.2f}x "
        f"(while loading: {p99['loading'] / steady:.2f}x; while switching and draining: "
        f"{p99['switching'] / steady:.2f}x)"
    )
    failures = [f for fs in load.failures.values() for f in fs]
    print(f"failed requests: {len(failures)}" + (f" (first: {failures[0]})" if failures else ""))
    print(f"versions the workers hold at the end: {held}")
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"(1 min) on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy", help="toy, or a packaged model's name")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0, help="of steady state")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--load-s", type=float, default=1.5, help="the toy's CPU-seconds to load")
    parser.add_argument("--device", default="cpu")
    asyncio.run(main(parser.parse_args()))
