"""What a lone embedding costs: the latency of one short text through the packaged MiniLM's
worker (`LocalEmbedder`, as the guardrails' topic, content and learned rails and a search's
query embedding call it) with no batching delay (the default), against the same worker
holding each request `--delay-ms` for company (the default before 2026-12-01) and the model
called directly in this process (the floor: no worker, no batching). One request at a time,
each text new (nothing cached), in alternating passes.

Usage: python bench/embedder_latency.py [--requests 200] [--delay-ms 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from backend.knowledge.embeddings import LocalEmbedder, local_model_path

TEXT = "How do antivirus programs detect keyloggers, and how can I check my laptop? ({})"


async def timed(embedder: LocalEmbedder, start: int, count: int) -> list[float]:
    took = []
    for i in range(start, start + count):
        began = time.perf_counter()
        await embedder.embed([TEXT.format(i)])
        took.append((time.perf_counter() - began) * 1000)
    return took


def direct(count: int, threads: int) -> list[float]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(local_model_path()), device="cpu")
    model.encode(["warm up"], show_progress_bar=False)
    took = []
    for i in range(count):
        began = time.perf_counter()
        model.encode([TEXT.format(-i)], normalize_embeddings=True, show_progress_bar=False)
        took.append((time.perf_counter() - began) * 1000)
    return took


async def main(args: argparse.Namespace) -> None:
    now = LocalEmbedder(timeout_s=300.0)
    held = LocalEmbedder(timeout_s=300.0, max_delay_s=args.delay_ms / 1000)
    results: dict[str, list[float]] = {"no delay (default)": [], f"{args.delay_ms:g} ms": []}
    try:
        await now.load()
        await held.load()
        step = max(1, args.requests // 10)
        for start in range(0, args.requests, step):  # alternating passes: the same spells
            results["no delay (default)"] += await timed(now, start, step)
            results[f"{args.delay_ms:g} ms"] += await timed(held, 100_000 + start, step)
    finally:
        await now.aclose()
        await held.aclose()
    results["direct, in process (floor)"] = await asyncio.to_thread(direct, args.requests, 2)
    print(f"one short text at a time, {args.requests} each, 2 threads (ms)")
    print(f"  {'':30} {'p50':>8} {'p99':>8}")
    for name, took in results.items():
        cuts = statistics.quantiles(took, n=100)  # cuts[49]: p50, cuts[98]: p99
        print(f"  {name:30} {cuts[49]:>8.2f} {cuts[98]:>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=3.0, help="the held worker's delay")
    asyncio.run(main(parser.parse_args()))
