"""Streaming chat under load: N concurrent runs through Sightline vs reading the LLM directly.

An OpenAI-compatible stub (own process) streams tokens at a fixed rate; each token is the time
it was emitted. N clients each create a conversation, send a message and subscribe to
`runEvents` over a WebSocket (graphql-transport-ws); in the same run, N clients read the stub's
SSE directly. Printed: delivered tokens/s, per-token latency p50/p99 (stub emit to client
receive) for both and the added latency, and the Sightline server's CPU-seconds per 1,000
tokens. Needs the Redis at 127.0.0.1:6379; uses an embedded PostgreSQL.

Usage: python bench/chat_stream.py [--clients 200] [--rate 20] [--tokens 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[1]
EVENTS = (
    "subscription($r: ID!) { runEvents(runId: $r) { __typename "
    "... on TokenDelta { text } ... on RunFailed { code message } } }"
)
CHAT = (
    'subscription($c: ID!) { chat(conversationId: $c, content: "go") { __typename '
    "... on TokenDelta { text } ... on RunFailed { code message } } }"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of the processes under it (the server's workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        total += sum(cpu_seconds(int(child)) for child in children)
    return total


async def wait_ready(url: str, within_s: float = 300.0) -> None:
    """Waits for `url` to answer below 500; a server loading its models on a busy machine can
    take minutes (a 60 s limit here failed runs on a loaded machine)."""
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url, timeout=1)).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"not ready: {url}")


def stamps(text: str, received: float) -> list[float]:
    from tests.llm_stub import clock_time  # the stub's clock words; ROOT is on the path by now

    return [received - clock_time(word) for word in text.split()]


async def call(http: httpx.AsyncClient, query: str, **variables: str) -> dict:
    """A GraphQL call that retries SERVICE_UNAVAILABLE with backoff, as a client should."""
    for attempt in range(8):
        body = (await http.post("/graphql", json={"query": query, "variables": variables})).json()
        errors = body.get("errors")
        if not errors:
            return body["data"]
        if errors[0].get("extensions", {}).get("code") != "SERVICE_UNAVAILABLE":
            raise SystemExit(f"request failed: {errors}")
        await asyncio.sleep(0.2 * 2**attempt)
    raise SystemExit("server stayed unavailable")


async def opened(ws_url: str, token: str) -> ClientConnection:
    """A graphql-transport-ws connection, initialised with the caller's token."""
    ws = await connect(ws_url, subprotocols=["graphql-transport-ws"], max_size=None)  # type: ignore[list-item]
    await ws.send(
        json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}})
    )
    await ws.recv()
    return ws


async def subscription(
    ws_url: str,
    token: str,
    query: str,
    variables: dict[str, str],
    ws: ClientConnection | None = None,
) -> AsyncIterator[tuple[float, dict]]:
    """One subscription over graphql-transport-ws, on a connection of its own or on `ws` (left
    open): each event's wall-clock time of arrival (before it is decoded) and `data` (a GraphQL
    error ends the bench), until the server completes it."""
    async with contextlib.AsyncExitStack() as own:
        if ws is None:
            ws = await own.enter_async_context(await opened(ws_url, token))
        subscribe = {"query": query, "variables": variables}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": subscribe}))
        async for raw in ws:
            received = time.time()
            message = json.loads(raw)
            if message["type"] == "complete":
                return
            if message["type"] == "error":
                raise SystemExit(f"subscription refused: {message.get('payload')}")
            if message["type"] != "next":
                continue
            if message["payload"].get("errors"):
                raise SystemExit(f"subscription error: {message['payload']['errors']}")
            yield received, message["payload"]["data"]


class Sockets:
    """WebSocket connections kept open across answers, as a graphql-ws client keeps its one
    socket for all its subscriptions: each answer takes an idle one (opening one when none is
    idle) and gives it back when its run completes."""

    def __init__(self, ws_url: str, token: str) -> None:
        self.ws_url, self.token = ws_url, token
        self._idle: list[ClientConnection] = []

    async def open(self, n: int) -> None:
        """At least `n` idle connections, opened before any clock starts."""
        missing = max(0, n - len(self._idle))
        self._idle += await asyncio.gather(
            *(opened(self.ws_url, self.token) for _ in range(missing))
        )

    @contextlib.asynccontextmanager
    async def one(self) -> AsyncIterator[ClientConnection]:
        ws = self._idle.pop() if self._idle else await opened(self.ws_url, self.token)
        yield ws
        self._idle.append(ws)  # not on an error: that connection's state is unknown

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(ws.close() for ws in idle))


@dataclass
class Stream:
    """One answer as a client saw it: each token's latency (stub emit to client receive, s) and
    the time to its first token (from the request that asks for the answer, s)."""

    latencies: list[float]
    first_token: float

    @property
    def tokens(self) -> int:
        return len(self.latencies)


async def through_sightline(
    base: str,
    token: str,
    delay: float,
    http: httpx.AsyncClient | None = None,
    sockets: Sockets | None = None,
    *,
    one_operation: bool = False,
) -> Stream:
    """A chat run: createConversation, sendMessage (the clock for the first token starts here),
    then `runEvents` over a WebSocket until the run completes. `http`: a client to share (its
    base URL `base`, `token` in its headers) rather than one of its own. `sockets`: the
    subscription runs on a connection kept open (a new connection for each answer without).
    `one_operation`: the `chat` subscription instead, which sends the message and streams the
    run's events (the clock starts as it is sent)."""
    await asyncio.sleep(delay)  # clients arrive over the ramp-up, not all in one instant
    headers = {"authorization": f"Bearer {token}"}
    async with contextlib.AsyncExitStack() as own:
        if http is None:
            http = await own.enter_async_context(
                httpx.AsyncClient(base_url=base, headers=headers, timeout=60)
            )
        created = await call(http, "mutation { createConversation { id } }")
        conversation = created["createConversation"]["id"]
        asked = time.time()
        if one_operation:
            query, field, variables = CHAT, "chat", {"c": conversation}
        else:
            sent = await call(
                http,
                'mutation($c: ID!) { sendMessage(conversationId: $c, content: "go") '
                "{ run { id } } }",
                c=conversation,
            )
            query, field, variables = EVENTS, "runEvents", {"r": sent["sendMessage"]["run"]["id"]}
    latencies: list[float] = []
    first = 0.0
    ws_url = base.replace("http", "ws") + "/graphql"
    async with contextlib.AsyncExitStack() as own:
        ws = await own.enter_async_context(sockets.one()) if sockets else None
        async for received, data in subscription(ws_url, token, query, variables, ws):
            event = data[field]
            if event["__typename"] == "TokenDelta":
                first = first or received - asked
                latencies += stamps(event["text"], received)
            elif event["__typename"] == "RunFailed":
                raise SystemExit(f"run failed: {event}")
    return Stream(latencies, first)


async def openai_stream(
    url: str,
    *,
    model: str = "clock",
    headers: dict[str, str] | None = None,
    delay: float = 0,
    http: httpx.AsyncClient | None = None,
) -> Stream:
    """A streamed `POST {url}/chat/completions` read as an OpenAI client reads it: the stub
    itself, or anything OpenAI-compatible in front of it. `http`: a client to share."""
    await asyncio.sleep(delay)
    latencies: list[float] = []
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    async with contextlib.AsyncExitStack() as own:
        if http is None:
            http = await own.enter_async_context(httpx.AsyncClient(timeout=60))
        asked, first = time.time(), 0.0
        request = http.stream("POST", f"{url}/chat/completions", json=body, headers=headers)
        async with request as response:
            if response.status_code != 200:
                raise SystemExit(f"{url}: HTTP {response.status_code}: {await response.aread()!r}")
            async for line in response.aiter_lines():
                received = time.time()
                if line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    delta = choices[0].get("delta", {}).get("content")
                    if delta and delta.strip():
                        first = first or received - asked
                        latencies += stamps(delta, received)
    return Stream(latencies, first)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[round(q * 1000) - 1] * 1000


@dataclass
class Stack:
    """The streaming stub and a Sightline server reading it, both running, and an admin token."""

    stub_url: str
    base: str
    token: str
    stub: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]


@contextlib.asynccontextmanager
async def sightline_stack(
    *,
    rate: float,
    tokens: int,
    streams: int,
    workers: int = 1,
    env: dict[str, str] | None = None,
    packaged_llm: bool = False,
) -> AsyncIterator[Stack]:
    """Starts the clock stub (`rate` tokens/s, `tokens` per answer) and a Sightline server (own
    data dir, limits off, room for `streams` runs at once) that chats with it; stops both.
    `env`: more settings for the server (they win over these). `packaged_llm`: the server
    chats with its embedded default model instead (the stub runs unused)."""
    data = Path(tempfile.mkdtemp(prefix="sightline-bench-chat-"))
    stub_port, port = free_port(), free_port()
    stub_url, base = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "STUB_TOKENS_PER_S": str(rate),
        "STUB_ANSWER_TOKENS": str(tokens),
        "SIGHTLINE_DATA_DIR": str(data),
        "SIGHTLINE_CHAT_LLM_BASE_URL": f"{stub_url}/v1",
        "SIGHTLINE_CHAT_LLM_MODEL": "clock",
        "SIGHTLINE_CHAT_MAX_TOKENS": str(tokens + 10),
        "SIGHTLINE_CHAT_MAX_ACTIVE_RUNS_PER_USER": str(streams * 2),
        "SIGHTLINE_LIMITS_ENABLED": "false",
        "SIGHTLINE_TELEMETRY_LOG_LEVEL": "WARNING",
        "SIGHTLINE_REDIS_KEY_PREFIX": f"bench-chat-{port}:",
        **(env or {}),
    }
    if packaged_llm:
        for name in ("SIGHTLINE_CHAT_LLM_BASE_URL", "SIGHTLINE_CHAT_LLM_MODEL"):
            env.pop(name)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT, "env": env}
    stub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.llm_stub:bench_app",
            "--port",
            str(stub_port),
            "--log-level",
            "warning",
        ],
        **quiet,
    )  # type: ignore[call-overload]
    log = (data / "server.log").open("w")
    serve = ["serve", "--port", str(port), "--workers", str(workers)]
    server = subprocess.Popen(  # its log stays in the data dir for a look after a failure
        [sys.executable, "-m", "backend", *serve],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    print(f"server log: {data / 'server.log'}", file=sys.stderr)
    try:
        await wait_ready(f"{base}/readyz")
        await wait_ready(f"{stub_url}/v1/chat/completions")
        password = (data / "initial-admin-password").read_text().strip()
        async with httpx.AsyncClient() as http:
            token = (
                await http.post(
                    f"{base}/oauth/token",
                    data={
                        "grant_type": "password",
                        "tenant": "default",
                        "username": "admin@sightline.local",
                        "password": password,
                    },
                )
            ).json()["access_token"]
        yield Stack(stub_url, base, token, stub, server)
    finally:
        for process in (server, stub):
            process.terminate()
            process.wait(30)
        await forget_keys(env)


async def forget_keys(env: dict[str, str]) -> None:
    """Deletes the server's Redis keys (its own prefix) once it has stopped."""
    from redis.asyncio import Redis

    client = Redis.from_url(env.get("SIGHTLINE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        prefix = env["SIGHTLINE_REDIS_KEY_PREFIX"]
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which clients start")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    args = parser.parse_args()

    async with sightline_stack(
        rate=args.rate, tokens=args.tokens, streams=args.clients, workers=args.workers
    ) as stack:
        base, token, server, stub = stack.base, stack.token, stack.server, stack.stub
        await asyncio.gather(*(through_sightline(base, token, 0) for _ in range(5)))  # warm-up

        cpu_before, started = cpu_seconds(server.pid), time.perf_counter()
        stub_before, clients_before = cpu_seconds(stub.pid), time.process_time()
        ours = await asyncio.gather(
            *(
                through_sightline(base, token, args.ramp * i / args.clients)
                for i in range(args.clients)
            )
        )
        ours_s, cpu = time.perf_counter() - started, cpu_seconds(server.pid) - cpu_before
        ours_stub, ours_clients = (
            cpu_seconds(stub.pid) - stub_before,
            time.process_time() - clients_before,
        )
        started = time.perf_counter()
        stub_before, clients_before = cpu_seconds(stub.pid), time.process_time()
        theirs = await asyncio.gather(
            *(openai_stream(f"{stack.stub_url}/v1") for _ in range(args.clients))
        )
        theirs_s = time.perf_counter() - started
        theirs_stub, theirs_clients = (
            cpu_seconds(stub.pid) - stub_before,
            time.process_time() - clients_before,
        )

    ours_lat = [x for stream in ours for x in stream.latencies]
    base_lat = [x for stream in theirs for x in stream.latencies]
    ours_tokens, base_tokens = sum(s.tokens for s in ours), sum(s.tokens for s in theirs)
    print(
        f"chat_stream: {os.cpu_count()} CPUs, {args.clients} concurrent streams x "
        f"{args.tokens} tokens at {args.rate:g} tokens/s, {args.workers} server worker(s), "
        "stub/server/clients on this machine"
    )
    print(f"{'measure':<40}{'sightline':>12}{'direct SSE':>12}{'added':>10}")
    print(
        f"{'delivered tokens/s':<40}{ours_tokens / ours_s:>12,.0f}{base_tokens / theirs_s:>12,.0f}"
    )
    for q in (0.5, 0.99):
        o, b = pct(ours_lat, q), pct(base_lat, q)
        print(
            f"{f'per-token latency p{round(q * 100)} (ms)':<40}{o:>12.1f}{b:>12.1f}{o - b:>10.1f}"
        )
    print(f"{'server CPU-s per 1,000 tokens':<40}{cpu / ours_tokens * 1000:>12.3f}")
    # What the rest of the machine spends, for the arithmetic of what one host can deliver.
    for label, mine, other in (
        ("stub LLM CPU-s per 1,000 tokens", ours_stub, theirs_stub),
        ("clients CPU-s per 1,000 tokens", ours_clients, theirs_clients),
    ):
        print(f"{label:<40}{mine / ours_tokens * 1000:>12.3f}{other / base_tokens * 1000:>12.3f}")
    print(
        f"tokens: sightline {ours_tokens}, direct {base_tokens} "
        f"(expected {args.clients * args.tokens} each)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    asyncio.run(main())
