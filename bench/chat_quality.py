"""Answer quality of the packaged model (SmolLM2-135M-Instruct): the new sampling defaults vs the
old ones (temperature 0.7, llama.cpp's top_p 0.95, no repeat penalty, no stop on loops).

36 prompts, scored automatically by substring / regex checks: factual questions, memory across
turns of one conversation (the last turn is scored), and instruction following. Every prompt
goes through the API of a real server (`python -m backend serve`: sign-in, sendMessage,
runEvents), so the answers come from the same code path as a user's: the agent graph, its
system prompt and memory, the embedded model. Both settings are model aliases of that one
server (SIGHTLINE_CHAT_MODELS) sharing the one loaded model; each is run with the same seeds.
Also printed: answers that ran away into a loop, and the mean answer length.

Needs the Redis at 127.0.0.1:6379; uses an embedded PostgreSQL.

Usage: python bench/chat_quality.py [--seeds 3] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chat_stream import call, free_port, wait_ready  # noqa: E402

# What the server used before: ChatSettings.temperature 0.7, the rest llama.cpp's defaults.
OLD = {"temperature": 0.7, "top_p": 0.95, "repeat_penalty": 1.0, "stop_repetition_tokens": 0}
EVENTS = (
    "subscription($r: ID!) { runEvents(runId: $r) { __typename "
    "... on TokenDelta { text } ... on RunFailed { code message } } }"
)
LOOP = re.compile(r"(.{1,24}?)\1{4,}", re.S)  # a short stretch said five times in a row


@dataclass(frozen=True)
class Case:
    kind: str  # factual | memory | instruction
    turns: tuple[str, ...]  # the last one is scored
    check: str  # a regex the answer must match (case-insensitive unless it starts with (?-i))
    max_words: int | None = None  # instruction: a short answer was asked for

    def passes(self, answer: str) -> bool:
        flags = 0 if self.check.startswith("(?-i)") else re.I
        pattern = self.check.removeprefix("(?-i)")
        if not re.search(pattern, answer, flags):
            return False
        return self.max_words is None or len(answer.split()) <= self.max_words


CASES = [
    Case("factual", ("Hello! What is the capital of France?",), r"\bParis\b"),
    Case("factual", ("What is the capital of Japan?",), r"\bTokyo\b"),
    Case("factual", ("What is the capital of Italy?",), r"\bRome\b"),
    Case("factual", ("What is the capital of Germany?",), r"\bBerlin\b"),
    Case("factual", ("Which is the largest planet in the solar system?",), r"\bJupiter\b"),
    Case("factual", ("How many days are there in a week?",), r"\b(7|seven)\b"),
    Case("factual", ("What colour is the sky on a clear day?",), r"\bblue\b"),
    Case("factual", ("Who wrote Romeo and Juliet?",), r"Shakespeare"),
    Case("factual", ("At what temperature in Celsius does water freeze?",), r"\b(0|zero)\b"),
    Case("factual", ("Which planet is known as the Red Planet?",), r"\bMars\b"),
    Case("factual", ("What is the largest ocean on Earth?",), r"\bPacific\b"),
    Case("factual", ("What language is spoken in Brazil?",), r"\bPortuguese\b"),
    Case("factual", ("How many legs does a spider have?",), r"\b(8|eight)\b"),
    Case("factual", ("What gas do plants take in from the air?",), r"carbon dioxide|\bCO2\b"),
    Case("factual", ("How many continents are there?",), r"\b(7|seven)\b"),
    Case("factual", ("What is the chemical formula of water?",), r"H2O|H₂O"),
    Case("memory", ("My name is Priya.", "What is my name?"), r"\bPriya\b"),
    Case("memory", ("My favourite colour is green.", "What is my favourite colour?"), r"green"),
    Case("memory", ("I live in Lisbon.", "Which city do I live in?"), r"\bLisbon\b"),
    Case("memory", ("My dog is called Rex.", "What is my dog called?"), r"\bRex\b"),
    Case("memory", ("I am 30 years old.", "How old am I?"), r"\b(30|thirty)\b"),
    Case("memory", ("I work as a nurse.", "What is my job?"), r"\bnurse\b"),
    Case("memory", ("My brother's name is Omar.", "What is my brother's name?"), r"\bOmar\b"),
    Case(
        "memory",
        ("I have two cats, Tom and Felix.", "Thanks.", "What are my cats called?"),
        r"\bTom\b.*\bFelix\b|\bFelix\b.*\bTom\b",
    ),
    Case("instruction", ("Answer with one word: what is the opposite of hot?",), r"cold", 3),
    Case("instruction", ("Reply with only the word yes.",), r"\byes\b", 3),
    Case(
        "instruction",
        ("List three colours, separated by commas.",),
        r"\w+\s*,\s*(and\s+)?\w+\s*,\s*(and\s+)?\w+",
    ),
    Case("instruction", ("Write the numbers from 1 to 5, separated by spaces.",), r"1 2 3 4 5"),
    Case("instruction", ("Say hello in French.",), r"bonjour|salut"),
    Case("instruction", ("Translate 'thank you' into Spanish.",), r"gracias"),
    Case("instruction", ("Write one sentence that contains the word banana.",), r"banana", 40),
    Case(
        "instruction",
        ("Answer in capital letters only: what is the capital of Spain?",),
        r"(?-i)MADRID",
    ),
    Case("instruction", ("Repeat exactly: The quick brown fox.",), r"quick brown fox", 12),
    Case("instruction", ("What is 10 minus 3? Answer with the number only.",), r"\b(7|seven)\b", 3),
    Case("instruction", ("Give me a short greeting.",), r"\b(hello|hi|hey|greetings)\b", 30),
    Case("instruction", ("Name one fruit. Answer in one word.",), r"^\W*\w+\W*$"),
]


async def answer(
    http: httpx.AsyncClient, ws_url: str, token: str, conversation: str, content: str, model: str
) -> str:
    sent = await call(
        http,
        "mutation($c: ID!, $m: String!, $a: String!) { sendMessage(conversationId: $c, "
        "content: $m, model: $a, onBusy: ENQUEUE) { run { id } } }",
        c=conversation,
        m=content,
        a=model,
    )
    run_id = sent["sendMessage"]["run"]["id"]
    parts: list[str] = []
    async with connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(
            json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}})
        )
        await ws.recv()
        await ws.send(
            json.dumps(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {"query": EVENTS, "variables": {"r": run_id}},
                }
            )
        )
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "complete":
                break
            if message["type"] != "next":
                continue
            event = message["payload"]["data"]["runEvents"]
            if event["__typename"] == "TokenDelta":
                parts.append(event["text"])
            elif event["__typename"] == "RunFailed":
                raise SystemExit(f"run failed: {event}")
    return "".join(parts)


async def evaluate(base: str, token: str, model: str, show: bool) -> dict[str, list]:
    """Every case through the API with one alias: pass/fail per kind, loops, lengths."""
    scores: dict[str, list] = {
        "factual": [],
        "memory": [],
        "instruction": [],
        "loops": [],
        "words": [],
    }
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as http:
        for case in CASES:
            created = await call(http, "mutation { createConversation { id } }")
            conversation = created["createConversation"]["id"]
            for turn in case.turns:
                text = await answer(
                    http, base.replace("http", "ws") + "/graphql", token, conversation, turn, model
                )
            ok = case.passes(text)
            scores[case.kind].append(ok)
            scores["loops"].append(bool(LOOP.search(text)))
            scores["words"].append(len(text.split()))
            if show:
                print(
                    f"[{model}] {'PASS' if ok else 'fail'} {case.turns[-1]!r} -> {text!r}",
                    file=sys.stderr,
                )
    return scores


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per setting")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer")
    parser.add_argument("--show", action="store_true", help="print every answer (stderr)")
    args = parser.parse_args()

    seeds = list(range(1, args.seeds + 1))
    aliases = {}
    for seed in seeds:
        aliases[f"new-{seed}"] = {"provider": "local", "seed": seed}  # the packaged defaults
        aliases[f"old-{seed}"] = {"provider": "local", "seed": seed, **OLD}
    data = Path(tempfile.mkdtemp(prefix="sightline-bench-quality-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SIGHTLINE_DATA_DIR": str(data),
        "SIGHTLINE_CHAT_LLM_BASE_URL": "",
        "SIGHTLINE_CHAT_LOCAL_MODEL": "true",
        "SIGHTLINE_CHAT_MODELS": json.dumps(aliases),
        "SIGHTLINE_CHAT_MAX_TOKENS": str(args.max_tokens),
        "SIGHTLINE_LIMITS_ENABLED": "false",
        "SIGHTLINE_TELEMETRY_LOG_LEVEL": "WARNING",
        "SIGHTLINE_REDIS_KEY_PREFIX": f"bench-quality-{port}:",
    }
    log = (data / "server.log").open("w")
    server = subprocess.Popen(  # its log stays in the data dir for a look after a failure
        [sys.executable, "-m", "backend", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    print(f"server log: {data / 'server.log'}", file=sys.stderr)
    results: dict[str, dict[str, list]] = {"new": {}, "old": {}}
    started = time.perf_counter()
    try:
        await wait_ready(f"{base}/readyz")
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
        for seed in seeds:
            for setting in ("new", "old"):
                scores = await evaluate(base, token, f"{setting}-{seed}", args.show)
                for key, values in scores.items():
                    results[setting].setdefault(key, []).extend(values)
    finally:
        server.terminate()
        server.wait(30)

    print(
        f"chat_quality: SmolLM2-135M-Instruct (Q4_1, llama.cpp, {os.cpu_count()} CPUs), "
        f"{len(CASES)} prompts x {len(seeds)} seeds per setting, answers up to "
        f"{args.max_tokens} tokens, through the API ({time.perf_counter() - started:.0f} s)"
    )
    print(f"new: {json.dumps(aliases['new-1'] | {'(rest)': 'RECOMMENDED_SAMPLING'})}")
    print(f"old: {json.dumps(OLD)}")
    print(f"{'measure':<34}{'new defaults':>14}{'old defaults':>14}")
    for kind in ("factual", "memory", "instruction"):
        new, old = results["new"][kind], results["old"][kind]
        print(
            f"{kind + ' (passed)':<34}{f'{sum(new)}/{len(new)}':>14}{f'{sum(old)}/{len(old)}':>14}"
        )
    total = {
        s: sum(sum(results[s][k]) for k in ("factual", "memory", "instruction")) for s in results
    }
    count = len(CASES) * len(seeds)
    print(f"{'score':<34}{total['new'] / count:>14.1%}{total['old'] / count:>14.1%}")
    print(
        f"{'answers that ran into a loop':<34}{sum(results['new']['loops']):>14}"
        f"{sum(results['old']['loops']):>14}"
    )
    mean = {s: sum(results[s]["words"]) / len(results[s]["words"]) for s in results}
    print(f"{'mean answer length (words)':<34}{mean['new']:>14.1f}{mean['old']:>14.1f}")


if __name__ == "__main__":
    asyncio.run(main())
