"""bench/guardrails.py's leave-one-family-out heads: a held-out family's rows, and the ordinary
rows its false positives are counted on, are never among what its head is fitted on (the bench
itself embeds a thousand rows and runs the classifier: not in the suite)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pytest

from tests.test_bench_peers import load_bench


class HashedVectors:
    """A stand-in for MiniLM: a fixed vector per text (the split is what is tested)."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [[b / 255 for b in hashlib.sha512(t.encode()).digest()] for t in texts]


async def test_no_held_out_row_is_fitted_on(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench("guardrails.py")
    own = [{"text": f"own {i}", "label": i % 2} for i in range(6)]
    monkeypatch.setattr(bench, "head_rows", lambda: own)
    rows: list[dict[str, Any]] = [
        {"text": f"{family} attack {i}", "label": 1, "family": family, "kind": "injection"}
        for family in ("alpha", "beta", "gamma")
        for i in range(4)
    ] + [
        {"text": f"ordinary {i}", "label": 0, "family": "general", "kind": "benign"}
        for i in range(40)
    ]
    fitted_on: list[set[str]] = []
    original = bench.fitted

    def recording(fit_rows: list[dict[str, Any]], vectors: Any) -> Any:
        fitted_on.append({r["text"] for r in fit_rows})
        return original(fit_rows, vectors)

    monkeypatch.setattr(bench, "fitted", recording)
    heads = await bench.left_out_heads(HashedVectors(), rows)
    _, test = bench.halves(rows)
    assert sorted(heads) == ["alpha", "beta", "gamma"]
    assert len(fitted_on) == 3
    for family, texts in zip(sorted(heads), fitted_on, strict=True):
        assert not any(r["text"] in texts for r in rows if r["family"] == family)
        assert all(r["text"] in texts for r in rows if r["label"] == 1 and r["family"] != family)
        assert not texts & {rows[i]["text"] for i in test}  # false positives counted there
        assert {r["text"] for r in own} <= texts
        threshold, scores = heads[family]
        assert len(scores) == len(rows)
        assert 0.0 <= threshold <= 1.0 + 1e-6


def test_the_toxicity_threshold_flags_at_most_the_share_asked() -> None:
    bench = load_bench("toxicity.py")
    scores = [0.99, 0.9, 0.8, 0.8, 0.5] + [0.1] * 95
    for fp in (0.0, 0.01, 0.02, 0.03, 0.05, 0.5):
        threshold = bench.threshold_at(scores, fp)
        assert sum(s >= threshold for s in scores) <= fp * len(scores)
    assert bench.threshold_at(scores, 0.02) <= 0.9  # the two highest are flagged
    assert bench.threshold_at(scores, 0.03) > 0.8  # a tie is never split to pass the share
    # the hand-written rows are neither duplicated nor shared between abuse and near misses
    rows = [t for texts in bench.TOXIC.values() for t in texts]
    misses = [t for texts in bench.NEAR_MISS.values() for t in texts]
    assert len(set(rows)) == len(rows)
    assert not set(rows) & set(misses)
