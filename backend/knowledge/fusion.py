"""How a hybrid search fuses its two rankings (vector and text) into one.

Each ranking gives `candidates` rows, each with its rank in the ranking it came from (`vrank`
or `trank`) and its score there (`vscore`: cosine similarity, `tscore`: BM25); the text
ranking's rows also carry their cosine similarity, computed for them in its own query.

- `rrf`: weighted reciprocal rank fusion, weight / (rrf_k + rank) per ranking. Ranks say
  nothing about how sure a ranking is: the text ranking's first place counts as much as the
  vector ranking's even when it matched one common word.
- `score` (the default): a score fusion weighted by the text ranking's confidence. A passage
  scores its cosine similarity (calibrated across questions) plus, if the text ranking found
  it, text_weight * confidence * its BM25 / the text ranking's best, where confidence is
  floor + (1 - floor) * how far the best stands out from the second, (s1 - s2) / s1.
  BM25 has no scale of its own (it grows with the question's length and its words' rarity):
  only its ratios are used. When one passage stands out in the words that tell passages
  apart, BM25 lifts it over closer vector matches; when many match them about as well, the
  word matches gain little and a close vector match stays on top. Passages only the vector
  ranking found gain nothing (they lack the question's rarer words). The weight is fitted
  by bench/retrieval_quality.py (a logistic fit, each labelled set scored with the weight
  fitted on the others); the floor is 0 by default: BM25 counts only as far as its best
  stands out. A floor tuned on one set lost to vector search on another.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from backend.config import KnowledgeSettings


class FusionMethod(StrEnum):
    RRF = "rrf"
    SCORE = "score"


def fuse_ranks(
    rows: list[dict[str, Any]],
    rrf_k: int,
    k: int,
    *,
    weights: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Weighted reciprocal rank fusion of single-ranking rows (each has `vrank` or `trank`):
    a row scores weight / (rrf_k + rank) for each ranking it is in."""
    weights = weights or {}
    fused = _merged(rows)
    for entry in fused:
        entry["score"] = sum(
            weights.get(rank, 1.0) / (rrf_k + entry[rank])
            for rank in ("vrank", "trank")
            if entry[rank] is not None
        )
    return _top(fused, k)


def fuse(rows: list[dict[str, Any]], k: int, settings: KnowledgeSettings) -> list[dict[str, Any]]:
    """The hybrid search's fusion of its two rankings' rows, as the settings say."""
    if settings.fusion == FusionMethod.RRF:
        weights = {"vrank": settings.rrf_vector_weight, "trank": settings.rrf_text_weight}
        return fuse_ranks(rows, settings.rrf_k, k, weights=weights)
    return fuse_scores(
        rows, k, text_weight=settings.fusion_text_weight, floor=settings.fusion_text_floor
    )


def fuse_scores(
    rows: list[dict[str, Any]], k: int, *, text_weight: float, floor: float
) -> list[dict[str, Any]]:
    """Confidence-weighted score fusion: vscore + text_weight * (floor + (1 - floor) *
    margin) * tscore / best, for the text ranking's rows (best and margin, (best - second) /
    best, among them); vscore alone for the others."""
    fused = _merged(rows)
    bm25 = sorted((float(e["tscore"]) for e in fused if e["trank"] is not None), reverse=True)
    best = bm25[0] if bm25 else 0.0
    second = bm25[1] if len(bm25) > 1 else 0.0
    confidence = floor + (1 - floor) * (best - second) / best if best > 0 else 0.0
    for entry in fused:
        similarity = entry.get("vscore")
        found = entry["trank"] is not None and best > 0
        textual = float(entry["tscore"]) / best if found else 0.0
        entry["score"] = (-1.0 if similarity is None else float(similarity)) + (
            text_weight * confidence * textual
        )
    return _top(fused, k)


def _merged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per chunk, with its rank in each ranking it came from."""
    fused: dict[uuid.UUID, dict[str, Any]] = {}
    for row in rows:
        entry = fused.setdefault(row["id"], {**row, "vrank": None, "trank": None})
        for rank in ("vrank", "trank"):
            if row[rank] is not None:
                entry[rank] = row[rank]
        for signal in ("vscore", "tscore"):
            if entry.get(signal) is None and row.get(signal) is not None:
                entry[signal] = row[signal]
    return list(fused.values())


def _top(fused: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    return sorted(fused, key=lambda r: (-r["score"], str(r["id"])))[:k]
