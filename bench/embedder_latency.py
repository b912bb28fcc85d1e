"""What an embedding costs with the packaged MiniLM's worker (`LocalEmbedder`, as the guardrails'
topic, content and learned rails and a search's query embedding call it) on ONNX Runtime (the
default since 2026-12-01) against the same worker on torch (the default before), one short text
at a time, each text new (nothing cached), in alternating passes; the model called directly in
this process on each runtime (the floors: no worker, no batching); and the throughput of a batch
of paragraphs (ingestion's case) through each worker. The two runtimes' vectors are compared too.

Usage: python bench/embedder_latency.py [--requests 200] [--paragraphs 64]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.config import EmbeddingRuntime
from backend.knowledge import onnx_minilm
from backend.knowledge.embeddings import LocalEmbedder, local_model_path

TEXT = "How do antivirus programs detect keyloggers, and how can I check my laptop? ({})"
# what the batch's paragraphs are drawn from
WORDS = (
    "the pool hands out connections and takes them back when a request ends while a timeout",
    "closes idle ones so that the database never sees more sessions than it allows",
)


async def timed(embedder: LocalEmbedder, start: int, count: int) -> list[float]:
    took = []
    for i in range(start, start + count):
        began = time.perf_counter()
        await embedder.embed([TEXT.format(i)])
        took.append((time.perf_counter() - began) * 1000)
    return took


def direct(runtime: EmbeddingRuntime, count: int, threads: int, cache: Path) -> list[float]:
    path = local_model_path()
    assert path is not None
    if runtime is EmbeddingRuntime.ONNX:
        model = onnx_minilm.load(path, cache, threads)
    else:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        model = SentenceTransformer(str(path), device="cpu")
    model.encode(["warm up"], show_progress_bar=False)
    took = []
    for i in range(count):
        began = time.perf_counter()
        model.encode([TEXT.format(-i)], normalize_embeddings=True, show_progress_bar=False)
        took.append((time.perf_counter() - began) * 1000)
    return took


def paragraphs(count: int) -> list[str]:
    pick = random.Random(3)
    words = " ".join(WORDS).split()
    return [" ".join(pick.choices(words, k=pick.randint(40, 250))) for _ in range(count)]


async def main(args: argparse.Namespace) -> None:
    cache = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    workers = {
        "worker, onnx (default)": LocalEmbedder(timeout_s=300.0, cache_dir=cache),
        "worker, torch (before)": LocalEmbedder(
            timeout_s=300.0, runtime=EmbeddingRuntime.TORCH, cache_dir=cache
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in workers}
    batch = paragraphs(args.paragraphs)
    rates: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    try:
        for worker in workers.values():
            await worker.load()
        step = max(1, args.requests // 10)
        for start in range(0, args.requests, step):  # alternating passes: the same spells
            for offset, (name, worker) in enumerate(workers.items()):
                results[name] += await timed(worker, offset * 100_000 + start, step)
        for name, worker in workers.items():
            best = float("inf")
            for _ in range(3):
                began = time.perf_counter()
                vectors[name] = np.asarray(await worker.embed(batch))
                best = min(best, time.perf_counter() - began)
            rates[name] = len(batch) / best
    finally:
        for worker in workers.values():
            await worker.aclose()
    for runtime in EmbeddingRuntime:
        results[f"direct, {runtime.value}, in process"] = await asyncio.to_thread(
            direct, runtime, args.requests, 2, cache
        )
    print(f"one short text at a time, {args.requests} each, 2 threads (ms)")
    print(f"  {'':32} {'p50':>8} {'p99':>8}")
    for name, took in results.items():
        cuts = statistics.quantiles(took, n=100)  # cuts[49]: p50, cuts[98]: p99
        print(f"  {name:32} {cuts[49]:>8.2f} {cuts[98]:>8.2f}")
    print(f"a batch of {len(batch)} paragraphs of 40-250 words (texts/s, best of 3)")
    for name, rate in rates.items():
        print(f"  {name:32} {rate:>8.1f}")
    onnx_vectors, torch_vectors = vectors.values()
    difference = np.abs(onnx_vectors - torch_vectors).max()
    print(f"largest difference of the two runtimes' vectors: {difference:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--paragraphs", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
