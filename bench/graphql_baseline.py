"""What the GraphQL stack costs: Sightline next to bare FastAPI / Starlette, measured in one run.

Starts three uvicorn servers in their own processes (Sightline on its embedded defaults or the
configured database, a bare FastAPI JSON endpoint, a bare Starlette WebSocket streamer), then
drives each from this process for the same time with the same client:

- HTTP: requests/s of `{ serverInfo { version } }` over POST vs a bare FastAPI POST JSON endpoint.
- WebSocket: messages/s of a `heartbeat(intervalMs: 0)` subscription (graphql-transport-ws) vs a
  bare Starlette socket sending the same number of small JSON messages.

Usage: python bench/graphql_baseline.py [--seconds 5] [--concurrency 16] [--messages 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]

BARE_APP = """
import asyncio, json
from fastapi import FastAPI, WebSocket
from pydantic import BaseModel

app = FastAPI()

class Body(BaseModel):
    query: str

@app.post("/json")
async def json_endpoint(body: Body) -> dict:
    return {"data": {"serverInfo": {"version": "0.0.0"}}}

@app.websocket("/ws")
async def stream(ws: WebSocket) -> None:
    await ws.accept()
    count = int(await ws.receive_text())
    for seq in range(count):
        await ws.send_text(json.dumps({"type": "next", "payload": {"data": {"seq": seq}}}))
    await ws.close()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}: {url}")
            try:
                if (await client.get(url, timeout=1)).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"server not ready: {url}")


async def http_rate(
    port: int, path: str, body: dict[str, str], seconds: float, concurrency: int
) -> float:
    """Requests/s over keep-alive connections with a minimal HTTP/1.1 client.

    httpx tops out near 400 req/s on this machine, below what the servers do; this client
    writes a prepared request and reads exactly Content-Length bytes back.
    """
    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    done = 0
    stop_at = time.perf_counter() + seconds

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        if status != 200 or b'"errors"' in body:
            raise SystemExit(f"{path} answered {status}: {body[:200]!r}")

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(20):  # warm-up
                await one(reader, writer)
            while time.perf_counter() < stop_at:
                await one(reader, writer)
                done += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def graphql_ws_rate(url: str, messages: int) -> float:
    async with connect(url, subprotocols=["graphql-transport-ws"], max_size=None) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        query = "subscription($n: Int) { heartbeat(intervalMs: 0, count: $n) { seq } }"
        await ws.send(
            json.dumps(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {"query": query, "variables": {"n": messages}},
                }
            )
        )
        received = 0
        started = time.perf_counter()
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "next":
                received += 1
            elif message["type"] == "complete":
                break
            elif message["type"] not in {"ping", "pong"}:
                raise SystemExit(f"unexpected message: {message}")
        elapsed = time.perf_counter() - started
        assert received == messages, received
        return received / elapsed


async def bare_ws_rate(url: str, messages: int) -> float:
    async with connect(url, max_size=None) as ws:
        await ws.send(str(messages))
        received = 0
        started = time.perf_counter()
        async for _ in ws:
            received += 1
        elapsed = time.perf_counter() - started
        assert received == messages, received
        return received / elapsed


async def best_of(runs: int, measure: Callable[[], Awaitable[float]]) -> float:
    return max([await measure() for _ in range(runs)])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3, help="best of N for each figure")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="sightline-bench-")
    env = {
        **os.environ,
        "SIGHTLINE_DATA_DIR": data_dir,
        "SIGHTLINE_GRAPHQL_HEARTBEAT_MIN_INTERVAL_MS": "0",
        "SIGHTLINE_TELEMETRY_LOG_LEVEL": "WARNING",
        # Rate limits stay on (their cost is part of the figure) but never refuse the load.
        "SIGHTLINE_LIMITS_RATES": json.dumps(
            {
                "free": {
                    kind: {"rate_per_s": 1e9, "burst": 10**9} for kind in ("query", "subscription")
                }
            }
        ),
    }
    bare_file = Path(data_dir) / "bare_app.py"
    bare_file.write_text(BARE_APP, encoding="utf-8")
    sl_port, bare_port = free_port(), free_port()
    uvicorn_flags = ["--no-access-log", "--log-level", "warning", "--ws-max-size", "1048576"]
    servers = [
        start(["backend", "serve", "--port", str(sl_port)], env),
        start(
            [
                "uvicorn",
                "--app-dir",
                data_dir,
                "bare_app:app",
                "--port",
                str(bare_port),
                *uvicorn_flags,
            ],
            env,
        ),
    ]
    try:
        await wait_ready(f"http://127.0.0.1:{sl_port}/readyz", servers[0])
        await wait_ready(f"http://127.0.0.1:{bare_port}/docs", servers[1])
        query = {"query": "{ serverInfo { version } }"}
        ours_http = await best_of(
            args.runs, lambda: http_rate(sl_port, "/graphql", query, args.seconds, args.concurrency)
        )
        bare_http = await best_of(
            args.runs, lambda: http_rate(bare_port, "/json", query, args.seconds, args.concurrency)
        )
        ours_ws = await best_of(
            args.runs, lambda: graphql_ws_rate(f"ws://127.0.0.1:{sl_port}/graphql", args.messages)
        )
        bare_ws = await best_of(
            args.runs, lambda: bare_ws_rate(f"ws://127.0.0.1:{bare_port}/ws", args.messages)
        )
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)

    print(
        f"graphql_baseline: {os.cpu_count()} CPUs, client and servers on this machine, "
        f"best of {args.runs}; HTTP {args.seconds:g}s x {args.concurrency} connections; "
        f"WebSocket {args.messages} messages"
    )
    print(f"{'measure':<44}{'sightline':>12}{'baseline':>12}{'ratio':>8}")
    rows = [
        ("HTTP req/s: serverInfo vs bare FastAPI JSON", ours_http, bare_http),
        ("WS msg/s: heartbeat sub vs bare Starlette WS", ours_ws, bare_ws),
    ]
    for name, ours, base in rows:
        print(f"{name:<44}{ours:>12,.0f}{base:>12,.0f}{ours / base:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
