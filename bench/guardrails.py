"""Guardrails: what the input rails add to a chat message, and how well the injection rail tells
attacks from ordinary requests.

Latency: every prompt of bench/data/prompts.jsonl (ordinary questions and attacks, 20 to 12,000
characters) goes through `check_input` of the local engine and of the NeMo engine, and of no
rails (`PassThroughGuards`) in the same run, one message at a time, the tenant's policy cached
as in steady state. Printed: p50/p99 per engine and the added p50/p99 over no rails.

Detection: the injection rail's decisions on the same labelled set (the default policy,
threshold 0.5), against the packaged classifier alone (prompt-guardrail) as the baseline:
detection rate on attacks, false-positive rate on ordinary requests, and per source.

Usage: python bench/guardrails.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from backend.agents.guards import Guards, PassThroughGuards
from backend.auth.principal import CredentialKind, Principal
from backend.auth.scopes import ALL_SCOPES
from backend.core.models import UserRole
from backend.guardrails.injection import InjectionDetector
from backend.guardrails.nemo import NemoGuardrailService
from backend.guardrails.normalize import normalise
from backend.guardrails.policy import GuardrailPolicy
from backend.guardrails.service import GuardrailService

DATA = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
PRINCIPAL = Principal(
    user_id=uuid.uuid4(),
    tenant_id=uuid.uuid4(),
    role=UserRole.MEMBER,
    scopes=ALL_SCOPES,
    credential=CredentialKind.ACCESS_TOKEN,
)


class CachedPolicy:
    """The steady state of a replica: the tenant's policy is in its cache (no database read)."""

    async def policy(self, principal: Principal) -> GuardrailPolicy:
        return GuardrailPolicy()

    def _decided(self, *args: Any) -> None:  # no audit writes: this measures the rails
        return None


class LocalRails(CachedPolicy, GuardrailService):
    pass


class NemoRails(CachedPolicy, NemoGuardrailService):
    pass


def documentation(limit: int) -> list[str]:
    """Paragraphs (200-2,000 characters) of the documentation installed with the packages."""
    roots = {Path(p) for p in sys.path if p.endswith("site-packages")}
    found: list[str] = []
    for root in sorted(roots):
        for path in sorted(root.glob("**/*")):
            if path.suffix not in {".md", ".rst", ".txt"} or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="ignore")
            except OSError:
                continue
            found += [p.strip() for p in text.split("\n\n") if 200 < len(p.strip()) < 2000]
    random.Random(1).shuffle(found)
    return found[:limit]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latencies(guards: Guards, texts: list[str], rounds: int) -> list[float]:
    for text in texts[:50]:  # warm up
        await guards.check_input(PRINCIPAL, text, [])
    took: list[float] = []
    for _ in range(rounds):
        for text in texts:
            started = time.perf_counter()
            await guards.check_input(PRINCIPAL, text, [])
            took.append((time.perf_counter() - started) * 1000)
    return took


def rates(flags: list[bool], rows: list[dict[str, Any]]) -> tuple[float, float]:
    attacks = [f for f, r in zip(flags, rows, strict=True) if r["label"] == 1]
    ordinary = [f for f, r in zip(flags, rows, strict=True) if r["label"] == 0]
    return sum(attacks) / len(attacks), sum(ordinary) / len(ordinary)


async def main(args: argparse.Namespace) -> None:
    lines = DATA.read_text(encoding="utf-8").split("\n")  # not splitlines: rows hold U+2028
    rows = [json.loads(line) for line in lines if line]
    texts = [r["text"] for r in rows]
    attacks = sum(r["label"] for r in rows)
    print(
        f"prompts: {len(rows)} from {DATA.name} ({attacks} attacks, {len(rows) - attacks} ordinary)"
    )

    local = LocalRails(None)  # type: ignore[arg-type]
    nemo = NemoRails(None)  # type: ignore[arg-type]
    await local.warm()

    # -- detection ---------------------------------------------------------------------------
    verdicts = [await local.check_input(PRINCIPAL, t, []) for t in texts]
    rail = [any(d.rail == "injection" for d in v.decisions) for v in verdicts]
    detector = InjectionDetector()
    baseline = [
        p >= 0.5 for p in detector.classifier_probability([normalise(t).text for t in texts])
    ]
    det, fp = rates(rail, rows)
    base_det, base_fp = rates(baseline, rows)
    print("\ninjection rail (default policy, threshold 0.5)")
    print(f"  {'':34} {'detection':>10} {'false pos.':>10}")
    print(f"  {'classifier alone (baseline)':34} {base_det:>10.1%} {base_fp:>10.1%}")
    print(f"  {'Sightline injection rail':34} {det:>10.1%} {fp:>10.1%}")
    print(f"  ratio rail / baseline detection: {det / base_det:.2f}x")
    by_source: dict[str, list[bool]] = defaultdict(list)
    for flag, row in zip(rail, rows, strict=True):
        by_source[f"{'attack' if row['label'] else 'ordinary'}: {row['source'][:58]}"].append(flag)
    print("  flagged per source:")
    for source, flags in sorted(by_source.items()):
        print(f"    {sum(flags):>4}/{len(flags):<4} {source}")
    paragraphs = documentation(args.paragraphs)
    if paragraphs:
        as_message = sum(detector.score(normalise(p)).score >= 0.5 for p in paragraphs)
        as_chunk = sum(detector.score(normalise(p), document=True).score >= 0.5 for p in paragraphs)
        print(
            f"  ordinary long text: {len(paragraphs)} paragraphs of the installed packages' "
            f"documentation and licences flagged {as_message / len(paragraphs):.1%} as a "
            f"message, {as_chunk / len(paragraphs):.1%} as a retrieved chunk"
        )

    # -- latency -------------------------------------------------------------------------------
    print(f"\ninput rails latency, {len(texts) * args.rounds} messages each, one at a time (ms)")
    none = await latencies(PassThroughGuards(), texts, args.rounds)
    base50, base99 = percentile(none, 0.5), percentile(none, 0.99)
    print(f"  {'':14} {'p50':>8} {'p99':>8} {'added p50':>10} {'added p99':>10}")
    print(f"  {'no rails':14} {base50:>8.3f} {base99:>8.3f}")
    for name, guards in (("local engine", local), ("nemo engine", nemo)):
        took = await latencies(guards, texts, args.rounds)
        p50, p99 = percentile(took, 0.5), percentile(took, 0.99)
        print(f"  {name:14} {p50:>8.3f} {p99:>8.3f} {p50 - base50:>10.3f} {p99 - base99:>10.3f}")
    print("\ngoal: input rails under 15 ms p99 added; detection >= 90% at <= 5% false positives")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompt set")
    parser.add_argument(
        "--paragraphs", type=int, default=3000, help="documentation paragraphs (0: skip)"
    )
    asyncio.run(main(parser.parse_args()))
