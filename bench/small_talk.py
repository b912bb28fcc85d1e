"""Small talk with a populated knowledge base answers as soon as with an empty one (issue 20).

One Sightline server on its embedded defaults: the packaged SmolLM2-135M-Instruct (no tool
calling: the agent decides itself whether to retrieve before the model answers) and the packaged
MiniLM. Each message is a new conversation (createConversation, sendMessage, then `runEvents`
over a WebSocket); time to first token runs from sendMessage to the first TokenDelta. Passes,
in this order, on the same server and tenant:

1. small talk with an empty knowledge base (the baseline);
2. `--documents` documents are ingested (docstrings of the standard library, through
   `ingestDocument(text:)`), then the same small talk again;
3. questions about those documents (the docstrings' summary lines), the control: these should
   be answered with sources.

Printed per pass: time to first token p50 and max, and how many runs searched the knowledge
base (ToolCallStarted). Messages take turns with one another `--rounds` times.
Needs the Redis at 127.0.0.1:6379; uses an embedded PostgreSQL.

Usage: python bench/small_talk.py [--documents 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chat_stream import call, sightline_stack, subscription
from retrieval_quality import stdlib

SMALL_TALK = (
    "Hi, how are you today?",
    "Good morning!",
    "Thanks, that was helpful.",
    "What's your name?",
    "Tell me a joke.",
    "Nice to meet you.",
    "What is 2 + 2?",
    "Have a great weekend!",
)
EVENTS = (
    "subscription($r: ID!) { runEvents(runId: $r) { __typename "
    "... on TokenDelta { text } ... on ToolCallStarted { name } "
    "... on RunFailed { code message } } }"
)
SEND = (
    "mutation($c: ID!, $m: String!) { sendMessage(conversationId: $c, content: $m) { run { id } } }"
)
INGEST = "mutation($t: String!, $s: String!) { ingestDocument(text: $t, source: $s) { id } }"
JOB = "query($id: ID!) { ingestionJob(id: $id) { status } }"


@dataclass(frozen=True)
class Turn:
    first_token_s: float
    searched: bool


async def turn(http: httpx.AsyncClient, ws_url: str, token: str, message: str) -> Turn:
    conversation = (await call(http, "mutation { createConversation { id } }"))[
        "createConversation"
    ]["id"]
    asked = time.perf_counter()
    run_id = (await call(http, SEND, c=conversation, m=message))["sendMessage"]["run"]["id"]
    first, searched = 0.0, False
    async for _, data in subscription(ws_url, token, EVENTS, {"r": run_id}):
        event = data["runEvents"]
        kind = event["__typename"]
        if kind == "TokenDelta" and not first:
            first = time.perf_counter() - asked
        elif kind == "ToolCallStarted":
            searched = True
        elif kind == "RunFailed":
            raise SystemExit(f"run failed: {event}")
    return Turn(first, searched)


async def ingest(http: httpx.AsyncClient, passages: list[str]) -> float:
    """Every passage as a document, 16 at a time, each followed until it is stored."""
    gate = asyncio.Semaphore(16)

    async def one(i: int, passage: str) -> None:
        async with gate:
            job = (await call(http, INGEST, t=passage, s=f"stdlib-{i}.txt"))["ingestDocument"]
            while True:
                status = (await call(http, JOB, id=job["id"]))["ingestionJob"]["status"]
                if status in ("COMPLETED", "UNCHANGED"):
                    return
                if status == "FAILED":
                    raise SystemExit(f"ingestion of passage {i} failed")
                await asyncio.sleep(0.2)

    started = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(passages)))
    return time.perf_counter() - started


def line(label: str, turns: list[Turn], baseline: list[Turn] | None = None) -> str:
    firsts = [t.first_token_s * 1000 for t in turns]
    p50, worst = statistics.median(firsts), max(firsts)
    searched = sum(t.searched for t in turns)
    figures = f"{p50:10.0f}{worst:10.0f}{searched:>6}/{len(turns):<4}"
    if baseline:
        ratio = p50 / statistics.median([t.first_token_s * 1000 for t in baseline])
        figures += f"{ratio:8.2f}"
    return f"{label:<52}{figures}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    labelled = stdlib(args.documents)
    questions = [q for q, _ in labelled.queries[: args.questions]]

    async with sightline_stack(rate=20, tokens=32, streams=4, packaged_llm=True) as stack:
        ws_url = stack.base.replace("http", "ws") + "/graphql"
        headers = {"authorization": f"Bearer {stack.token}"}
        async with httpx.AsyncClient(base_url=stack.base, headers=headers, timeout=300) as http:

            async def pass_(messages: tuple[str, ...] | list[str]) -> list[Turn]:
                return [
                    await turn(http, ws_url, stack.token, m)
                    for _ in range(args.rounds)
                    for m in messages
                ]

            await turn(http, ws_url, stack.token, "warm up")  # the model's first load
            empty = await pass_(SMALL_TALK)
            ingest_s = await ingest(http, labelled.passages)
            populated = await pass_(SMALL_TALK)
            control = await pass_(questions)

    print(
        f"small_talk: {os.cpu_count()} CPUs, the packaged SmolLM2-135M-Instruct (no tool "
        f"calling) and MiniLM; {len(SMALL_TALK)} small-talk messages x {args.rounds} rounds, "
        f"each in a new conversation; {args.documents} documents ingested in {ingest_s:.0f} s"
    )
    print(f"{'time to first token (ms)':<52}{'p50':>10}{'max':>10}{'searched':>11}{'ratio':>8}")
    print(line("small talk, empty knowledge base (baseline)", empty))
    print(line("small talk, populated knowledge base", populated, empty))
    print(line("questions about the documents (control)", control, empty))


if __name__ == "__main__":
    asyncio.run(main())
