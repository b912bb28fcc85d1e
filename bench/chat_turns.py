"""A chat turn's fixed cost: the server's CPU and Redis commands per GraphQL turn, against one
`/v1/chat/completions` request of the same answer, in the same run on the same server.

A turn is what bench/chat_stream.py's clients do: `createConversation`, `sendMessage`, then
`runEvents` over a WebSocket of its own until the run ends. Its answer is short (2 tokens by
default) so that the figure is the turn's own cost (authentication, the conversation and run
rows, the agent graph and its checkpoint, budgets, leases, the event log, storing the answer),
not its tokens'. The baseline is a streamed `POST /v1/chat/completions` of the same answer (no
conversation: no memory, no rows). `--concurrency` at a time, `--turns` of each after a
warm-up; the passes alternate (`--rounds`) so that a change in the machine's load meets both.

Server CPU: the server process and its children (cpu_seconds). Redis commands: the change in
the Redis's INFO commandstats over the pass (commands that scripts run included; MULTI and EXEC
count), so nothing else should be using the Redis at 127.0.0.1:6379 meanwhile.

Usage: python bench/chat_turns.py [--turns 300] [--concurrency 10] [--tokens 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis.asyncio import Redis

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # chat_stream; tests.llm_stub (its clock words)

from chat_stream import cpu_seconds, openai_stream, sightline_stack, through_sightline  # noqa: E402

TURN = "GraphQL turn"
REQUEST = "/v1 request (baseline)"


@dataclass
class Pass:
    path: str
    calls: int
    cpu_s: float
    redis_commands: int
    wall_s: float
    tokens: int


async def redis_commands(redis: Redis) -> int:
    """Commands the Redis has run since it started (INFO commandstats; the INFO not counted)."""
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def measure(
    path: str,
    calls: int,
    concurrency: int,
    call: Callable[[], Awaitable[int]],
    server_pid: int,
    redis: Redis,
) -> Pass:
    """`calls` calls, `concurrency` at a time; each returns the tokens it received."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with gate:
            return await call()

    commands, cpu, started = await redis_commands(redis), cpu_seconds(server_pid), time.monotonic()
    tokens = await asyncio.gather(*(one() for _ in range(calls)))
    wall = time.monotonic() - started
    cpu = cpu_seconds(server_pid) - cpu
    return Pass(path, calls, cpu, await redis_commands(redis) - commands - 1, wall, sum(tokens))


def per_call(passes: list[Pass], path: str, value: Callable[[Pass], float]) -> float:
    """A figure of a path's passes, summed, per call."""
    mine = [p for p in passes if p.path == path]
    return sum(value(p) for p in mine) / sum(p.calls for p in mine)


def format_table(passes: list[Pass]) -> str:
    """Per call: the server's CPU ms and Redis commands of a turn and of a request, and their
    ratio; then the tokens each received."""
    lines = [f"{'per call':<28}{TURN:>16}{REQUEST:>26}{'ratio':>8}"]
    figures: list[tuple[str, Callable[[Pass], float]]] = [
        ("server CPU ms", lambda p: p.cpu_s * 1000),
        ("Redis commands", lambda p: p.redis_commands),
    ]
    for label, value in figures:
        ours, base = per_call(passes, TURN, value), per_call(passes, REQUEST, value)
        ratio = f"{ours / base:.1f}" if base else "-"
        lines.append(f"{label:<28}{ours:>16.1f}{base:>26.1f}{ratio:>8}")
    ours, base = (per_call(passes, path, lambda p: p.tokens) for path in (TURN, REQUEST))
    lines.append(f"{'tokens received':<28}{ours:>16.1f}{base:>26.1f}")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    passes: list[Pass] = []
    redis = Redis.from_url(os.environ.get("SIGHTLINE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    streams = args.concurrency * 2
    async with (
        sightline_stack(rate=args.rate, tokens=args.tokens, streams=streams) as stack,
        httpx.AsyncClient(
            base_url=stack.base, headers={"authorization": f"Bearer {stack.token}"}, timeout=60
        ) as http,
    ):
        alias = (await http.get("/v1/models")).json()["data"][0]["id"]
        headers = {"authorization": f"Bearer {stack.token}"}

        async def turn() -> int:
            return (await through_sightline(stack.base, stack.token, 0, http=http)).tokens

        async def request() -> int:
            url = f"{stack.base}/v1"
            return (await openai_stream(url, model=alias, headers=headers, http=http)).tokens

        for call in (turn, request):  # warm-up: imports, pools, caches
            await asyncio.gather(*(call() for _ in range(5)))
        for _ in range(args.rounds):
            for path, call in ((REQUEST, request), (TURN, turn)):
                await asyncio.sleep(1)  # what the last pass left running settles outside this one
                passes.append(
                    await measure(path, args.turns, args.concurrency, call, stack.server.pid, redis)
                )
                print(f"done: {path}", file=sys.stderr)
    await redis.aclose()
    print(
        f"chat turns: {os.cpu_count()} CPUs, load average {load:.1f} at start; "
        f"{args.turns} of each x {args.rounds} rounds, {args.concurrency} at a time, "
        f"{args.tokens}-token answers at {args.rate:g} tokens/s; one server worker"
    )
    print(format_table(passes))
    expected = args.turns * args.rounds * args.tokens
    print(
        "tokens: "
        + ", ".join(
            f"{path} {sum(p.tokens for p in passes if p.path == path)}" for path in (TURN, REQUEST)
        )
        + f" (expected {expected} each)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300, help="turns (and requests) per pass")
    parser.add_argument("--concurrency", type=int, default=10, help="calls at a time")
    parser.add_argument("--tokens", type=int, default=2, help="tokens per answer")
    parser.add_argument("--rate", type=float, default=200.0, help="tokens/s of the stub")
    parser.add_argument("--rounds", type=int, default=2, help="passes of each path")
    asyncio.run(main(parser.parse_args()))
