"""The toxicity rail (the packaged `alt-profanity-check` classifier, sentence by sentence) against
the word list (the profanity rail, LDNOOBW) on the same rows, in one run:

- its threshold is chosen on one set of ordinary text (the benign rows of bench/data/prompts.jsonl
  and paragraphs of the installed packages' documentation sent as messages): the lowest that
  flags at most `--fp` of them;
- detection on hand-written abusive messages (bench/data/toxicity.py: insults, harassment,
  threats, demeaning generalisations), which neither was fitted on;
- false positives on ordinary text the threshold was not chosen on: the ordinary rows of
  bench/data/families.jsonl, the hand-written near misses (killed processes, killer whales,
  questions about abuse), code questions;
- the time a message takes.

Usage: python bench/toxicity.py [--fp 0.01] [--paragraphs 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data.toxicity import NEAR_MISS, TOXIC
from guardrails import DATA, FAMILIES, code_snippets, documentation, read

from backend.guardrails import toxicity
from backend.guardrails.profanity import find_profanity


def threshold_at(scores: list[float], fp: float) -> float:
    """The lowest threshold (a score flags at >=) that flags at most `fp` of `scores`."""
    ranked = sorted(scores, reverse=True)
    allowed = int(fp * len(ranked))
    return min(1.0, ranked[allowed] + 1e-6) if allowed < len(ranked) else 0.0


def main(args: argparse.Namespace) -> None:
    tuning = [r["text"] for r in read(DATA) if r["label"] == 0]
    tuning += documentation(args.paragraphs)
    started = time.perf_counter()
    tuning_scores = [toxicity.score(t) for t in tuning]
    per_message_ms = (time.perf_counter() - started) * 1000 / len(tuning)
    threshold = threshold_at(tuning_scores, args.fp)
    # the baseline: the same texts through scikit-learn's predict_proba (the same scores)
    vectorizer, model = toxicity._model()
    started = time.perf_counter()
    for text in tuning:
        if parts := toxicity.sentences(text):
            model.predict_proba(vectorizer.transform(parts))
    sklearn_ms = (time.perf_counter() - started) * 1000 / len(tuning)

    held: dict[str, list[str]] = {f"toxic: {k}": v for k, v in TOXIC.items()}
    held |= {f"near miss: {k}": v for k, v in NEAR_MISS.items()}
    held["ordinary: families.jsonl"] = [r["text"] for r in read(FAMILIES) if r["label"] == 0]
    held["ordinary: code questions"] = code_snippets(200)

    print(
        f"toxicity rail: threshold {threshold:.4f}, chosen to flag at most {args.fp:.1%} of "
        f"{len(tuning)} ordinary texts (prompts.jsonl's benign rows and documentation "
        f"paragraphs); {per_message_ms:.3f} ms a text (mean, one thread; through scikit-learn's "
        f"predict_proba, the same scores: {sklearn_ms:.3f} ms)"
    )
    print(f"  {'rows':42} {'n':>5} {'classifier':>11} {'word list':>10}")
    totals: dict[str, list[int]] = {}
    for name, texts in held.items():
        by_model = sum(toxicity.score(t) >= threshold for t in texts)
        by_words = sum(bool(find_profanity(t)) for t in texts)
        kind = name.split(":")[0]
        total = totals.setdefault(kind, [0, 0, 0])
        total[0] += len(texts)
        total[1] += by_model
        total[2] += by_words
        shares = f"{by_model / len(texts):>11.1%} {by_words / len(texts):>10.1%}"
        print(f"  {name:42} {len(texts):>5} {shares}")
    for kind, (n, by_model, by_words) in totals.items():
        label = "detected" if kind == "toxic" else "flagged (false positives)"
        print(f"  all {kind} rows, {label:30} {n:>5} {by_model / n:>11.1%} {by_words / n:>10.1%}")
    tuned_words = sum(bool(find_profanity(t)) for t in tuning) / len(tuning)
    tuned_model = sum(s >= threshold for s in tuning_scores) / len(tuning)
    print(f"  the tuning set itself: classifier {tuned_model:.1%}, word list {tuned_words:.1%}")
    spread = statistics.quantiles(tuning_scores, n=100)
    print(f"  ordinary scores p50 / p99: {spread[49]:.3f} / {spread[98]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp", type=float, default=0.01, help="share of ordinary text flagged")
    parser.add_argument("--paragraphs", type=int, default=2000)
    main(parser.parse_args())
