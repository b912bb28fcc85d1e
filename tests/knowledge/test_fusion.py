"""The hybrid search's fusion of its vector and text rankings (backend.knowledge.fusion), on
candidates as the two rankings' queries return them: each with its rank in the ranking it came
from and both signals (cosine similarity `vscore`, BM25 `tscore`, 0 without the question's
words). The service's own ranking SQL is exercised in test_service.py."""

from __future__ import annotations

import uuid
from typing import Any

from backend.config import KnowledgeSettings
from backend.knowledge.fusion import fuse, fuse_ranks, fuse_scores

WEIGHT, FLOOR = KnowledgeSettings().fusion_text_weight, KnowledgeSettings().fusion_text_floor


def candidates(*passages: tuple[str, float, float]) -> tuple[list[dict[str, Any]], dict]:
    """Rows of both rankings for passages (name, cosine, BM25), ranked as the queries would:
    by cosine (every passage) and by BM25 (those that match a word); a passage in both
    rankings comes as two rows, as the service gets them."""
    ids = {name: uuid.uuid5(uuid.NAMESPACE_OID, name) for name, _, _ in passages}
    by_vector = sorted(passages, key=lambda p: -p[1])
    by_text = sorted((p for p in passages if p[2] > 0), key=lambda p: -p[2])
    rows = [
        {"id": ids[n], "vrank": r, "trank": None, "vscore": v, "tscore": t}
        for r, (n, v, t) in enumerate(by_vector, start=1)
    ]
    rows += [
        {"id": ids[n], "vrank": None, "trank": r, "vscore": v, "tscore": t}
        for r, (n, v, t) in enumerate(by_text, start=1)
    ]
    return rows, {i: n for n, i in ids.items()}


def names(fused: list[dict[str, Any]], named: dict) -> list[str]:
    return [named[r["id"]] for r in fused]


def test_a_passage_strong_in_both_signals_ranks_first() -> None:
    rows, named = candidates(
        ("close, no words", 0.62, 0.0),
        ("close, the words", 0.60, 9.0),  # the question's rare words, well above the rest
        ("far, some words", 0.35, 3.0),
        ("far, no words", 0.30, 0.0),
    )
    top = fuse_scores(rows, 4, text_weight=WEIGHT, floor=FLOOR)
    assert names(top, named)[0] == "close, the words"
    assert len(top) == 4  # one entry per passage, however many rankings it is in
    first = top[0]
    assert (first["vrank"], first["trank"]) == (2, 1)
    assert (first["vscore"], first["tscore"]) == (0.60, 9.0)


def test_a_close_vector_match_is_not_pushed_out_by_weak_word_matches() -> None:
    """Twelve passages match the question's words about as well as each other (a common word,
    a long question): BM25 is not sure, so they gain little, and the one passage close in
    meaning stays first. Rank fusion puts BM25's first place above it."""
    weak = [(f"word match {i}", 0.30 + i / 1000, 4.0 - i / 100) for i in range(12)]
    rows, named = candidates(("close in meaning", 0.71, 0.0), *weak)
    assert names(fuse_scores(rows, 3, text_weight=WEIGHT, floor=FLOOR), named)[0] == (
        "close in meaning"
    )
    by_rank = names(fuse_ranks(rows, 5, 3), named)
    assert by_rank[0] != "close in meaning"  # what the score fusion is for


def test_a_word_match_that_stands_out_lifts_a_passage_over_closer_ones() -> None:
    """One passage has the question's rare words and nothing else comes near it in BM25: it
    gains the full text weight and moves above passages closer in meaning; the same BM25
    score with no margin (a second passage as good) gains only the floor's share of it."""
    closer = 0.50 + WEIGHT * (1 + FLOOR) / 2  # between the two gains
    standout, named = candidates(
        ("closest", closer, 0.0),
        ("close", closer - 0.02, 0.0),
        ("rare words", 0.50, 12.0),
        ("one word", 0.40, 2.0),
    )
    top = fuse_scores(standout, 4, text_weight=WEIGHT, floor=FLOOR)
    assert names(top, named)[0] == "rare words"
    assert top[0]["score"] == 0.50 + WEIGHT * (FLOOR + (1 - FLOOR) * (12 - 2) / 12)
    tie, named = candidates(
        ("closest", closer, 0.0),
        ("close", closer - 0.02, 0.0),
        ("rare words", 0.50, 12.0),
        ("same words", 0.20, 12.0),
    )
    order = names(fuse_scores(tie, 4, text_weight=WEIGHT, floor=FLOOR), named)
    assert order[:3] == ["closest", "close", "rare words"]


def test_without_word_matches_the_order_is_the_vector_order() -> None:
    rows, named = candidates(("b", 0.5, 0.0), ("a", 0.7, 0.0), ("c", 0.2, 0.0))
    top = fuse_scores(rows, 2, text_weight=WEIGHT, floor=FLOOR)
    assert names(top, named) == ["a", "b"]
    assert [r["score"] for r in top] == [0.7, 0.5]  # the cosine similarity itself


def test_the_settings_choose_the_fusion() -> None:
    weak = [(f"word match {i}", 0.30, 4.0 - i / 100) for i in range(12)]
    rows, named = candidates(("close in meaning", 0.71, 0.0), *weak)
    by_score = fuse(rows, 3, KnowledgeSettings())
    assert names(by_score, named)[0] == "close in meaning"
    by_rank = fuse(rows, 3, KnowledgeSettings(fusion="rrf", rrf_k=5, rrf_text_weight=2.0))
    assert names(by_rank, named)[0] == "word match 0"
    assert by_rank[0]["score"] == 2.0 / (5 + 1) + 1.0 / (5 + 2)
