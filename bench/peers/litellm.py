"""Sightline next to LiteLLM's proxy, in one run, against the same streaming stub.

The clock stub of bench/chat_stream.py (own process; every token is the time it was emitted)
is read six ways at each concurrency: directly (the baseline), through LiteLLM's proxy
(`litellm --config`, one process, no database, offline), through Sightline's
`/v1/chat/completions`, and through a Sightline chat run: `sendMessage`, then `runEvents` over
a WebSocket, new for each answer or kept open across a client's answers (as graphql-ws clients
keep theirs), and the `chat` subscription (both in one operation) on a kept socket. Printed,
per path and concurrency: time to first token (from the request that asks for the answer) and
per-chunk latency (stub emit to client receive) p50/p99, both as added to the direct read of
the same run, and the server's CPU-seconds per 1,000 tokens delivered (the proxy's or
Sightline's process and its children). Sightline's paths share one server.

LiteLLM runs from a virtualenv of its own (.bench-venvs/litellm, created on first use, reused
while bench/peers/litellm-requirements.txt is unchanged): every package pinned to the version
found to work here, since two LiteLLM releases were once compromised. It is started with
`LITELLM_LOCAL_MODEL_COST_MAP` and the other `LITELLM_LOCAL_*` switches on, or it fetches its
cost map from the internet at import.

Needs the Redis at 127.0.0.1:6379 (Sightline's); uses an embedded PostgreSQL.

Usage: python bench/peers/litellm.py [--streams 1,20,100] [--rate 20] [--tokens 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.llm_stub (the stub's clock words)


def _chat_stream() -> ModuleType:
    """bench/chat_stream.py, whose stub, clients and measurement this bench shares (bench/ is not
    a package, and putting it on sys.path would shadow packages named like its scripts)."""
    spec = importlib.util.spec_from_file_location(
        "bench_chat_stream", ROOT / "bench" / "chat_stream.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chat_stream = _chat_stream()
Stream = chat_stream.Stream
cpu_seconds, free_port, pct = chat_stream.cpu_seconds, chat_stream.free_port, chat_stream.pct
openai_stream, through_sightline = chat_stream.openai_stream, chat_stream.through_sightline
sightline_stack, wait_ready = chat_stream.sightline_stack, chat_stream.wait_ready
WARM_UP = 3  # answers at once through each path before the passes (`--streams 1` too)

REQUIREMENTS = Path(__file__).with_name("litellm-requirements.txt")
VENV = ROOT / ".bench-venvs" / "litellm"
# Everything LiteLLM would otherwise fetch from the internet at start (cost map, model lists).
OFFLINE = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOG": "ERROR",
}
BASELINE = "stub direct (baseline)"


def litellm_venv() -> Path:
    """The proxy's virtualenv, created or brought to the pinned versions; its `litellm` script."""
    stamp = VENV / "requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"installing LiteLLM's proxy into {VENV} (a few minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        stamp.write_text(wanted)
    return VENV / "bin" / "litellm"


def litellm_version() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("litellm["):
            return line.split("==")[1].strip()
    return "?"


@contextlib.asynccontextmanager
async def litellm_proxy(stub_url: str) -> AsyncIterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """LiteLLM's proxy, one process, no database, serving the stub as model `clock`: its URL,
    its master key (the callers' Bearer token) and its process."""
    executable = litellm_venv()
    work = Path(tempfile.mkdtemp(prefix="sightline-bench-litellm-"))
    config = work / "config.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: clock\n"
        "    litellm_params:\n"
        "      model: openai/clock\n"
        f"      api_base: {stub_url}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )
    port = free_port()
    key = f"sk-{secrets.token_hex(32)}"  # it refuses to start without one, and so it should
    env = {**os.environ, **OFFLINE, "LITELLM_MASTER_KEY": key}
    env.pop("DATABASE_URL", None)
    log = (work / "litellm.log").open("w")
    print(f"litellm log: {work / 'litellm.log'}", file=sys.stderr)
    proxy = subprocess.Popen(
        [str(executable), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(f"{url}/health/liveliness")  # about 20 s when idle
        yield f"{url}/v1", key, proxy
    finally:
        proxy.terminate()
        proxy.wait(30)


@dataclass
class Measured:
    streams: int
    path: str
    first_token_p50: float  # ms
    chunk_p50: float  # ms
    chunk_p99: float  # ms
    cpu_per_1k: float | None  # server CPU-s per 1,000 tokens; None for the baseline
    tokens: int
    expected: int


def format_table(rows: Sequence[Measured]) -> str:
    """The baseline's figures as measured; every other path's as added to the baseline of its
    concurrency (`+`), so the columns read as what a hop costs."""
    header = (
        f"{'streams':>7}  {'path':<30}{'first token p50':>16}{'chunk p50':>11}{'chunk p99':>11}"
        f"{'server CPU-s/1k tok':>21}{'tokens':>14}"
    )
    lines = [header]
    baselines = {row.streams: row for row in rows if row.path == BASELINE}
    for row in rows:
        base = baselines.get(row.streams)
        figures = [row.first_token_p50, row.chunk_p50, row.chunk_p99]
        if row.path == BASELINE or base is None:
            cells = [f"{x:.1f}" for x in figures]
        else:
            added = [
                x - b
                for x, b in zip(
                    figures, [base.first_token_p50, base.chunk_p50, base.chunk_p99], strict=True
                )
            ]
            cells = [f"{x:+.1f}" for x in added]
        cpu = "-" if row.cpu_per_1k is None else f"{row.cpu_per_1k:.3f}"
        lines.append(
            f"{row.streams:>7}  {row.path:<30}{cells[0]:>16}{cells[1]:>11}{cells[2]:>11}"
            f"{cpu:>21}{f'{row.tokens}/{row.expected}':>14}"
        )
    return "\n".join(lines)


async def measure(
    path: str,
    streams: int,
    rounds: int,
    ramp: float,
    tokens: int,
    read: Callable[[float], Awaitable[Stream]],
    server: subprocess.Popen[bytes] | None,
) -> Measured:
    """`rounds` times, `streams` concurrent answers started over `ramp` seconds."""
    got: list[Stream] = []
    before = cpu_seconds(server.pid) if server else 0.0
    for _ in range(rounds):
        got += await asyncio.gather(*(read(ramp * i / streams) for i in range(streams)))
    cpu = cpu_seconds(server.pid) - before if server else None
    latencies = [x for s in got for x in s.latencies]
    delivered = sum(s.tokens for s in got)
    return Measured(
        streams=streams,
        path=path,
        first_token_p50=statistics.median(s.first_token for s in got) * 1000,
        chunk_p50=pct(latencies, 0.5),
        chunk_p99=pct(latencies, 0.99),
        cpu_per_1k=None if cpu is None else cpu / delivered * 1000,
        tokens=delivered,
        expected=streams * rounds * tokens,
    )


async def idle_cpu(servers: dict[str, subprocess.Popen[bytes]], seconds: float) -> dict[str, float]:
    """Each server's CPU over `seconds` with no request, as a share of one core: its background
    work (timers, leases, heartbeats), which every CPU-per-token figure also carries."""
    before = {name: cpu_seconds(p.pid) for name, p in servers.items()}
    await asyncio.sleep(seconds)
    return {name: (cpu_seconds(p.pid) - before[name]) / seconds for name, p in servers.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--streams", default="1,20,100", help="concurrent streams, comma-separated (one pass each)"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which streams start")
    parser.add_argument(
        "--idle-s", type=float, default=10.0, help="seconds of no requests to measure idle CPU"
    )
    parser.add_argument(
        "--min-answers",
        type=int,
        default=5,
        help="at low concurrency, rounds of streams until this many answers (first-token p50)",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]

    load = os.getloadavg()[0]
    rows: list[Measured] = []
    unbounded = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        sightline_stack(rate=args.rate, tokens=args.tokens, streams=max(*counts, WARM_UP)) as stack,
        litellm_proxy(stack.stub_url) as (litellm_url, litellm_key, proxy),
        # One client per path, shared by its streams, as a real client would: a client each
        # (its TLS context alone is milliseconds of CPU) would load this machine's clients.
        httpx.AsyncClient(timeout=60, limits=unbounded) as http,
        httpx.AsyncClient(
            base_url=stack.base,
            headers={"authorization": f"Bearer {stack.token}"},
            timeout=60,
            limits=unbounded,
        ) as graphql,
        contextlib.aclosing(
            chat_stream.Sockets(stack.base.replace("http", "ws") + "/graphql", stack.token)
        ) as sockets,
    ):
        auth = {"authorization": f"Bearer {stack.token}"}
        models = (await graphql.get("/v1/models")).json()["data"]
        alias = models[0]["id"]
        paths: list[
            tuple[str, Callable[[float], Awaitable[Stream]], subprocess.Popen[bytes] | None]
        ] = [
            (BASELINE, lambda d: openai_stream(f"{stack.stub_url}/v1", delay=d, http=http), None),
            (
                f"LiteLLM {litellm_version()} proxy",
                lambda d: openai_stream(
                    litellm_url,
                    headers={"authorization": f"Bearer {litellm_key}"},
                    delay=d,
                    http=http,
                ),
                proxy,
            ),
            (
                "Sightline /v1/chat/completions",
                lambda d: openai_stream(
                    f"{stack.base}/v1", model=alias, headers=auth, delay=d, http=http
                ),
                stack.server,
            ),
            (
                "Sightline GraphQL runEvents",
                lambda d: through_sightline(stack.base, stack.token, d, http=graphql),
                stack.server,
            ),
            (
                "Sightline GraphQL, kept socket",
                lambda d: through_sightline(
                    stack.base, stack.token, d, http=graphql, sockets=sockets
                ),
                stack.server,
            ),
            (
                "Sightline GraphQL chat (1 op)",
                lambda d: through_sightline(
                    stack.base, stack.token, d, http=graphql, sockets=sockets, one_operation=True
                ),
                stack.server,
            ),
        ]
        for _, read, _ in paths:  # warm-up: imports, pools, caches
            await asyncio.gather(*(read(0) for _ in range(WARM_UP)))
        await sockets.open(max(counts))  # a client's socket is open before it asks
        idle = await idle_cpu({"LiteLLM": proxy, "Sightline": stack.server}, args.idle_s)
        for streams in counts:
            rounds = max(1, math.ceil(args.min_answers / streams))
            ramp = args.ramp if streams > 1 else 0.0
            for path, read, server in paths:
                await asyncio.sleep(1)  # what the last pass left running settles outside this one
                rows.append(await measure(path, streams, rounds, ramp, args.tokens, read, server))
                print(f"done: {streams} streams, {path}", file=sys.stderr)

    print(
        f"litellm peers: {os.cpu_count()} CPUs, load average {load:.1f} at start (a shared, busy "
        f"machine: expect noise), stub/servers/clients on this machine; {args.tokens} tokens per "
        f"answer at {args.rate:g} tokens/s, streams started over {args.ramp:g} s; times in ms; "
        "one Sightline worker, one LiteLLM process"
    )
    print(format_table(rows))
    print(
        f"idle CPU, no request for {args.idle_s:g} s after the warm-up (in every CPU-s/1k figure "
        "above, over each pass's duration): "
        + ", ".join(f"{name} {share * 100:.1f}% of a core" for name, share in idle.items())
    )


if __name__ == "__main__":
    asyncio.run(main())
