"""What operating models costs on the hot path: server CPU per chat token and per image, with
issue #18's recording on and off, in one run.

Off (the baseline): tracing off (no OTLP endpoint: spans are non-recording) and
`SIGHTLINE_DRIFT_ENABLED=0`. On: spans exported over OTLP/HTTP (the SDK's batch processor and
exporter, as in production) to a local sink that accepts and discards them, and
`SIGHTLINE_DRIFT_ENABLED=1`. The cost metrics have no switch: they are in both. Each mode gets
its own server (bench/chat_stream.py's stack: the clock stub LLM, a Sightline server with vision
on); the modes alternate `--rounds` times and their figures are summed. Workloads: `--clients`
chat runs at once (sendMessage, then runEvents over a WebSocket: bench/chat_stream.py's client),
then `--images` vision jobs (classification of one photo, as in bench/vision.py) `--image-clients`
at a time, each read to its end over `visionJobEvents`. Server CPU counts its inference workers
(and is shown again for the API process alone, where spans are made and exported).

Usage: python bench/observability_overhead.py [--clients 20] [--tokens 50] [--images 40]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chat_stream import cpu_seconds, sightline_stack, subscription, through_sightline  # noqa: E402

# Named, so the sink tells an image's traces (the job and its event stream) from a chat run's.
ANALYZE = (
    "mutation Analyze($image: Upload!) { analyzeImage(image: $image, tasks: [CLASSIFY]) { id } }"
)
JOB_EVENTS = (
    "subscription JobEvents($id: ID!) { visionJobEvents(id: $id) { __typename "
    "... on VisionJobFailed { code message } } }"
)
GOAL_PCT = 3.0
VISION_OPERATIONS = frozenset({"graphql.mutation Analyze", "graphql.subscription JobEvents"})


@dataclass
class Figures:
    """One mode's sums over its rounds."""

    chat_cpu_s: float = 0.0
    chat_api_cpu_s: float = 0.0  # the API process alone (where spans are made and exported)
    tokens: int = 0
    vision_cpu_s: float = 0.0
    vision_api_cpu_s: float = 0.0
    images: int = 0


class Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that reads each export and throws it away."""

    received = 0
    bytes = 0
    spans = 0
    names: ClassVar[Counter[str]] = Counter()  # spans received, by name (db statements by verb)
    traces: ClassVar[Counter[bytes]] = Counter()  # spans received, by trace id
    vision: ClassVar[set[bytes]] = set()  # the trace ids of images' work
    counting = True  # off while span_cost runs: decoding would count as the spans' cost

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not Sink.counting:
            self.send_response(200)
            self.end_headers()
            return
        Sink.received += 1
        Sink.bytes += len(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                Sink.spans += len(scope.spans)
                for span in scope.spans:
                    Sink.names[_short(span.name)] += 1
                    Sink.traces[span.trace_id] += 1
                    if span.name in VISION_OPERATIONS:
                        Sink.vision.add(span.trace_id)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _short(name: str) -> str:
    """A span's name without its operation or route (a DB statement's keeps its verb)."""
    return name if name.startswith("db ") else name.split(" ", 1)[0]


def own_cpu_seconds(pid: int) -> float:
    """CPU time of one process, without the processes under it (its inference workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def photo_jpeg() -> bytes:
    try:
        from skimage import data

        pixels = np.asarray(data.chelsea())
    except ImportError:
        pixels = (np.random.default_rng(1).random((300, 450, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def vision_job(http: httpx.AsyncClient, base: str, token: str, image: bytes) -> None:
    """One analyzeImage job (multipart upload), read over its event stream to its end."""
    operations = {"query": ANALYZE, "variables": {"image": None}}
    response = await http.post(
        "/graphql",
        data={"operations": json.dumps(operations), "map": json.dumps({"0": ["variables.image"]})},
        files={"0": ("photo.jpg", image, "image/jpeg")},
    )
    body = response.json()
    if body.get("errors"):
        raise SystemExit(f"analyzeImage failed: {body['errors']}")
    job = body["data"]["analyzeImage"]["id"]
    ws_url = base.replace("http", "ws") + "/graphql"
    async for _, data in subscription(ws_url, token, JOB_EVENTS, {"id": job}):
        event = data["visionJobEvents"]
        if event["__typename"] == "VisionJobFailed":
            raise SystemExit(f"vision job failed: {event}")


async def vision_load(base: str, token: str, images: int, at_once: int) -> None:
    image = photo_jpeg()
    remaining = images
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as http:

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await vision_job(http, base, token, image)

        await asyncio.gather(*(client() for _ in range(at_once)))


async def one_mode(on: bool, args: argparse.Namespace, sink_url: str, into: Figures) -> None:
    env = {
        "SIGHTLINE_VISION_ENABLED": "true",
        "SIGHTLINE_VISION_WORKERS": "1",
        "SIGHTLINE_DRIFT_ENABLED": "1" if on else "0",
        "SIGHTLINE_TELEMETRY_OTLP_ENDPOINT": sink_url if on else "",
    }
    async with sightline_stack(
        rate=args.rate, tokens=args.tokens, streams=args.clients, env=env
    ) as stack:
        base, token, server = stack.base, stack.token, stack.server
        await asyncio.gather(*(through_sightline(base, token, 0) for _ in range(3)))  # warm-up
        await vision_load(base, token, 4, 2)
        # The batch processor exports every 5 s: the warm-up's spans leave (with the exporter's
        # first-use costs) before counting starts, and each phase's own are exported, and
        # counted, inside its window. Both modes wait alike.
        await asyncio.sleep(args.settle)

        before, api_before = cpu_seconds(server.pid), own_cpu_seconds(server.pid)
        streams = await asyncio.gather(
            *(
                through_sightline(base, token, args.ramp * i / args.clients)
                for i in range(args.clients)
            )
        )
        await asyncio.sleep(args.settle)
        into.chat_cpu_s += cpu_seconds(server.pid) - before
        into.chat_api_cpu_s += own_cpu_seconds(server.pid) - api_before
        into.tokens += sum(s.tokens for s in streams)

        before, api_before = cpu_seconds(server.pid), own_cpu_seconds(server.pid)
        await vision_load(base, token, args.images, args.image_clients)
        await asyncio.sleep(args.settle)
        into.vision_cpu_s += cpu_seconds(server.pid) - before
        into.vision_api_cpu_s += own_cpu_seconds(server.pid) - api_before
        into.images += args.images


def span_cost_us(sink_url: str, spans: int) -> float:
    """CPU-µs one span adds, exported as the server exports it (a DB statement's span with
    its attributes), against the same span with tracing off; this process, every thread."""
    sys.path.insert(0, str(ROOT))
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from backend.config import TelemetrySettings
    from backend.core.telemetry import build_tracer_provider

    # as backend/core/db.py makes them: the database on the tracer's scope, the statement on
    # the span, under the work that runs it (off: a non-recording parent, so no span at all)
    scope = {"db.name": "postgres", "server.address": "/tmp/sightline/postgres"}
    attributes = {
        "db.system": "postgresql",
        "db.statement": "SELECT conversations.created_at, conversations.updated_at, "
        "conversations.id, conversations.tenant_id, conversations.owner_id, conversations.title, "
        "conversations.archived_at FROM conversations WHERE conversations.id = $1::UUID FOR UPDATE",
    }

    def spend(settings: TelemetrySettings) -> float:
        provider = build_tracer_provider(settings)
        tracer = provider.get_tracer("bench", attributes=scope)
        started = time.process_time()
        with tracer.start_as_current_span("work"):
            for i in range(spans):
                if trace.get_current_span().is_recording():
                    span = tracer.start_span(
                        "db SELECT", kind=SpanKind.CLIENT, attributes=attributes
                    )
                    span.end()
                if i % 500 == 499:
                    provider.force_flush()  # a server's pace: none dropped for a full queue
        provider.force_flush()
        provider.shutdown()
        return time.process_time() - started

    Sink.counting = False
    try:
        spend(TelemetrySettings(otlp_endpoint=sink_url))  # warm-up
        on = spend(TelemetrySettings(otlp_endpoint=sink_url))
        off = spend(TelemetrySettings())
    finally:
        Sink.counting = True
    return (on - off) / spans * 1e6


def drift_cost_us(samples: int = 2_000) -> tuple[float, float]:
    """CPU-µs the drift samples of one image (the bench's photo, classified) and of one chat
    turn take on the request path, timed alone."""
    sys.path.insert(0, str(ROOT))
    from backend.config import DriftSettings
    from backend.lifecycle.drift import DriftRecorder

    recorder = DriftRecorder(DriftSettings(max_pending=samples * 16))
    rgb = np.asarray(Image.open(io.BytesIO(photo_jpeg())).convert("RGB"))
    result = {"classes": [{"label": "tabby", "score": 0.5}]}
    started = time.process_time()
    for _ in range(samples):
        recorder.image("efficientnet-lite0", "1", rgb)
        recorder.vision_result("efficientnet-lite0", "1", result)
    image_us = (time.process_time() - started) / samples * 1e6
    started = time.process_time()
    for _ in range(samples):
        recorder.chat_turn("clock", "1", prompt_chars=2, answer_chars=200, rails=[])
    return image_us, (time.process_time() - started) / samples * 1e6


def format_table(rows: list[tuple[str, float, float]]) -> str:
    """Each figure beside the same run's baseline, and the percent it adds."""
    lines = [f"{'measure':<34}{'off (baseline)':>16}{'on':>12}{'added':>10}"]
    for label, off, on in rows:
        added = (on - off) / off * 100 if off else float("nan")
        lines.append(f"{label:<34}{off:>16.3f}{on:>12.3f}{added:>+9.1f}%")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20, help="chat runs at once")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per answer")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which runs start")
    parser.add_argument("--images", type=int, default=40, help="vision jobs per round")
    parser.add_argument("--image-clients", type=int, default=4, help="vision jobs at once")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs, alternating")
    parser.add_argument(
        "--settle", type=float, default=6.0, help="seconds after each phase (exports: 5 s)"
    )
    parser.add_argument("--spans", type=int, default=20_000, help="spans timed alone")
    args = parser.parse_args()

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
    load = os.getloadavg()
    started = time.monotonic()
    per_span_us = span_cost_us(sink_url, args.spans)
    drift_image_us, drift_turn_us = drift_cost_us()
    off, on = Figures(), Figures()
    # each round's CPU-ms per chat token and per image, its mode: the noise
    per_round: list[tuple[float, float, bool]] = []
    try:
        for _ in range(args.rounds):
            for mode, into in ((False, off), (True, on)):
                chat, tokens, vision = into.chat_cpu_s, into.tokens, into.vision_cpu_s
                await one_mode(mode, args, sink_url, into)
                per_round.append(
                    (
                        (into.chat_cpu_s - chat) / max(into.tokens - tokens, 1) * 1000,
                        (into.vision_cpu_s - vision) / args.images * 1000,
                        mode,
                    )
                )
    finally:
        sink.shutdown()
    print(
        f"observability_overhead: {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end ({time.monotonic() - started:.0f} s); "
        f"{args.rounds} round(s) of {args.clients} chat runs x {args.tokens} tokens and "
        f"{args.images} images ({args.image_clients} at once) per mode"
    )
    print(
        "off: no OTLP endpoint (non-recording spans), SIGHTLINE_DRIFT_ENABLED=0; "
        "on: OTLP/HTTP batch export to a discarding sink, SIGHTLINE_DRIFT_ENABLED=1"
    )
    print(
        format_table(
            [
                (
                    "server CPU-ms per chat token",
                    off.chat_cpu_s / max(off.tokens, 1) * 1000,
                    on.chat_cpu_s / max(on.tokens, 1) * 1000,
                ),
                (
                    "  of which the API process",
                    off.chat_api_cpu_s / max(off.tokens, 1) * 1000,
                    on.chat_api_cpu_s / max(on.tokens, 1) * 1000,
                ),
                (
                    "server CPU-ms per image",
                    off.vision_cpu_s / max(off.images, 1) * 1000,
                    on.vision_cpu_s / max(on.images, 1) * 1000,
                ),
                (
                    "  of which the API process",
                    off.vision_api_cpu_s / max(off.images, 1) * 1000,
                    on.vision_api_cpu_s / max(on.images, 1) * 1000,
                ),
            ]
        )
    )
    for mode in (False, True):
        tokens = ", ".join(f"{ms:.2f}" for ms, _, m in per_round if m is mode)
        images = ", ".join(f"{ms:.1f}" for _, ms, m in per_round if m is mode)
        print(
            f"each round, {'on' if mode else 'off'}: CPU-ms per chat token {tokens}; "
            f"per image {images}"
        )
    # what the on servers did, warm-ups included; anything not an image's is the chat runs'
    # (their sign-in too)
    runs, images = args.rounds * (args.clients + 3), args.rounds * (args.images + 4)
    image_spans = sum(Sink.traces[t] for t in Sink.vision)
    per_run, per_image = (Sink.spans - image_spans) / runs, image_spans / images
    run_ms = off.chat_cpu_s / max(off.tokens, 1) * 1000 * args.tokens
    image_ms = off.vision_cpu_s / max(off.images, 1) * 1000
    run_cost_ms = (per_run * per_span_us + drift_turn_us) / 1000
    image_cost_ms = (per_image * per_span_us + drift_image_us) / 1000
    print(
        f"one span exported costs {per_span_us:.1f} CPU-us ({args.spans:,} timed alone); drift "
        f"samples {drift_image_us:.1f} CPU-us per image, {drift_turn_us:.1f} per chat turn"
    )
    print(
        f"estimate: a chat run's {per_run:.1f} spans and its samples about {run_cost_ms:.2f} "
        f"CPU-ms, {run_cost_ms / run_ms * 100:.1f}% of its {run_ms:.0f} ({args.tokens} tokens); "
        f"an image's {per_image:.1f} spans and samples about {image_cost_ms:.2f} CPU-ms, "
        f"{image_cost_ms / image_ms * 100:.1f}% of its {image_ms:.0f}"
    )
    print(
        f"tokens: off {off.tokens}, on {on.tokens}; the sink received {Sink.spans:,} spans in "
        f"{Sink.received} exports ({Sink.bytes:,} bytes); goal: at most {GOAL_PCT:g}% added"
    )
    print(
        "spans per chat run and image together, by name: "
        + ", ".join(f"{name} {n / (runs + images):.2f}" for name, n in Sink.names.most_common())
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    asyncio.run(main())
