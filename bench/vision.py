"""Vision: the inference pool's dynamic batching on EfficientNet-Lite0, and OCR throughput.

Classification: closed-loop clients (1, 8 and 32 at once) each send one image per request to
the pool, with dynamic batching on (the built-in manifest: max batch 8, sizes 1-2-4-8, max
delay 4 ms) and off (max batch 1), in the same run and on the same worker (one process, all CPU
threads). Printed per setting: images/s and p50/p95 latency; the ratio of throughputs at each
concurrency.

OCR: rendered pages of text read by the Tesseract engine with 1 and 2 OCR threads (each with
its own reused engine), pages/s.

Remote (`--backend remote`): the same closed-loop clients (1, 8, 32) against the local pool
(batching on) and against `sightline inference serve` (Triton through PyTriton, the same
manifest, batcher and threads) through the remote runtime over HTTP, then over gRPC, in the
same run, one after the other on the same machine. Printed: images/s and p50/p95 per backend,
remote/local throughput per protocol.

Usage: python bench/vision.py [--requests 192] [--pages 24] [--device cpu] [--backend remote]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from backend.inference.client import InferenceClient
from backend.inference.manifest import builtin_manifests
from backend.inference.pool import InferencePool
from backend.inference.remote import RemoteInference
from backend.vision.ocr import OcrEngine
from backend.vision.preprocess import classification_input

TESSDATA = Path("/usr/share/tesseract-ocr/5/tessdata")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def photo() -> np.ndarray:
    try:
        from skimage import data

        return np.asarray(data.chelsea())
    except ImportError:
        return (np.random.default_rng(1).random((300, 450, 3)) * 255).astype(np.uint8)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(pool: InferenceClient, x: np.ndarray, clients: int, requests: int) -> tuple:
    latencies: list[float] = []
    remaining = requests

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await pool.infer("efficientnet-lite0", [x])
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.95)


async def classification(args: argparse.Namespace) -> None:
    [base] = [m for m in builtin_manifests() if m.name == "efficientnet-lite0"]
    x = classification_input(photo(), base.input)
    threads = os.cpu_count() or 1
    settings = {
        "batching on": dataclasses.replace(base, max_queue=4096),
        "batching off": dataclasses.replace(base, max_batch=1, max_delay_ms=0.0, max_queue=4096),
    }
    print(f"EfficientNet-Lite0 on {args.device}, 1 worker x {threads} threads, "
          f"{args.requests} requests per row")  # fmt: skip
    print(f"  {'setting':14} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8}")
    figures: dict[tuple[str, int], tuple[float, float, float]] = {}
    for name, manifest in settings.items():
        pool = InferencePool([manifest], workers=1, device=args.device, threads=threads)
        await pool.start()
        await pool.wait_ready()
        await load(pool, x, 4, 32)  # warm up
        for clients in (1, 8, 32):
            rate, p50, p95 = await load(pool, x, clients, args.requests)
            figures[name, clients] = (rate, p50, p95)
            print(f"  {name:14} {clients:>7} {rate:>9.1f} {p50 * 1000:>8.1f} {p95 * 1000:>8.1f}")
        await pool.close()
    single = figures["batching off", 1][1]
    for clients in (1, 8, 32):
        on, off = figures["batching on", clients], figures["batching off", clients]
        print(f"  clients {clients:>2}: batching/no batching throughput {on[0] / off[0]:.2f}x; "
              f"p95 with batching {on[2] / single:.2f}x the single-request p50")  # fmt: skip
    print("  goal at 32 clients: throughput >= 2x, p95 <= 2x single-request latency")


async def ocr(args: argparse.Namespace) -> None:
    font = ImageFont.truetype(FONT, 22)
    page = Image.new("RGB", (1000, 700), "white")
    draw = ImageDraw.Draw(page)
    for line in range(14):
        draw.text((40, 30 + line * 46), f"Line {line}: the quick brown fox jumps over 1,234 lazy "
                  "dogs.", font=font, fill="black")  # fmt: skip
    rgb = np.asarray(page)
    print(f"\nOCR (Tesseract, rendered 14-line pages), {args.pages} pages per row")
    rates = {}
    for threads in (1, 2):
        engine = OcrEngine(TESSDATA, threads)
        await engine.read(rgb)  # each thread's engine is created on its first page
        await asyncio.gather(*(engine.read(rgb) for _ in range(threads)))
        started = time.perf_counter()
        texts = await asyncio.gather(*(engine.read(rgb) for _ in range(args.pages)))
        rates[threads] = args.pages / (time.perf_counter() - started)
        words = statistics.mean(len(t["words"]) for t in texts)
        print(f"  {threads} OCR worker(s): {rates[threads]:.2f} pages/s ({words:.0f} words/page)")
        engine.close()
    print(f"  2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _triton_batches(metrics_url: str) -> tuple[float, float]:
    """Inferences and model executions so far, from Triton's Prometheus metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as answer:
        text = answer.read().decode()
    totals = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["nv_inference_count"], totals["nv_inference_exec_count"]


def _start_service(threads: int, device: str) -> tuple[subprocess.Popen[bytes], str, str, str]:
    """The service, its HTTP and gRPC addresses and its metrics URL, once its model is ready."""
    ports = [_free_port() for _ in range(3)]
    command = [sys.executable, "-m", "backend", "inference", "serve", "--model",
               "efficientnet-lite0", "--host", "127.0.0.1", "--http-port", str(ports[0]),
               "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--parent-pid", str(os.getpid())]  # fmt: skip
    env = {"SIGHTLINE_VISION_SERVE_STUB_ENV": str(Path(".venv-triton-stub").resolve()),
           **os.environ, "SIGHTLINE_VISION_THREADS": str(threads),
           "SIGHTLINE_VISION_DEVICE": device}  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(
                f"http://{url}/v2/models/efficientnet-lite0/ready", timeout=2
            ):
                metrics = f"http://127.0.0.1:{ports[2]}/metrics"
                return process, url, f"127.0.0.1:{ports[1]}", metrics
        except OSError:
            time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(
        "sightline inference serve did not start (pip install -r requirements-serve.txt)"
    )


async def remote_vs_local(args: argparse.Namespace) -> None:
    [manifest] = [m for m in builtin_manifests() if m.name == "efficientnet-lite0"]
    manifest = dataclasses.replace(manifest, max_queue=4096)
    x = classification_input(photo(), manifest.input)
    threads = os.cpu_count() or 1
    print(f"EfficientNet-Lite0 on {args.device}, local pool (1 worker x {threads} threads) "
          f"vs inference service (Triton, {threads} threads), {args.requests} a row")  # fmt: skip
    print(f"  {'backend':14} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8}")
    figures: dict[tuple[str, int], tuple[float, float, float]] = {}

    async def measure(name: str, client: InferenceClient) -> None:
        await load(client, x, 4, 32)  # warm up
        for clients in (1, 8, 32):
            rate, p50, p95 = await load(client, x, clients, args.requests)
            figures[name, clients] = (rate, p50, p95)
            print(f"  {name:14} {clients:>7} {rate:>9.1f} {p50 * 1000:>8.1f} {p95 * 1000:>8.1f}")

    pool = InferencePool([manifest], workers=1, device=args.device, threads=threads)
    await pool.start()
    await pool.wait_ready()
    await measure("local pool", pool)
    await pool.close()
    process, url, grpc_url, metrics = _start_service(threads, args.device)
    try:
        for protocol, address in (("http", url), ("grpc", grpc_url)):
            remote = RemoteInference([manifest], address, call_timeout_s=60, protocol=protocol)
            await remote.start()
            await remote.warmed(manifest.name)
            await measure(f"remote {protocol}", remote)
            await remote.close()
        items, runs = _triton_batches(metrics)
        print(f"  Triton ran {items:.0f} images in {runs:.0f} batches: {items / runs:.2f} a batch")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for clients in (1, 8, 32):
        local = figures["local pool", clients][0]
        http, grpc = (figures[f"remote {p}", clients][0] / local for p in ("http", "grpc"))
        print(f"  clients {clients:>2}: remote/local throughput http {http:.2f}x, grpc {grpc:.2f}x")
    print("  goal at 32 clients: remote >= 0.8x the local throughput")


async def main(args: argparse.Namespace) -> None:
    if args.backend == "remote":
        await remote_vs_local(args)
        return
    await classification(args)
    if TESSDATA.is_dir():
        await ocr(args)
    else:
        print(f"\nOCR skipped: no {TESSDATA} (apt-get install tesseract-ocr-eng)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=("local", "remote"), default="local")
    asyncio.run(main(parser.parse_args()))
