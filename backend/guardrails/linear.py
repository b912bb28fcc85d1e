"""Linear text classifiers (a TF-IDF vectorizer, then a linear model) scored with their own
numbers, without scikit-learn's machinery around each call.

The packaged toxicity classifier (five sigmoid-calibrated linear SVMs) took 1.45 ms to score the
two-letter message "go" through `predict_proba`, nearly all of it input checks, sparse-matrix
building and dispatch; it runs on every message and on every held-back chunk of every answer.
Here the same analyser, vocabulary and weights give the same probability (to rounding: the
sums run in another order) in a few microseconds. Only the shapes this module knows
are taken (`LinearTextScorer.of` answers None for any other, and the caller keeps
scikit-learn): a fitted `TfidfVectorizer` (raw or sublinear term frequencies, binary or not,
L2 or no norm) before a binary `LogisticRegression`, or before a `CalibratedClassifierCV` of
linear models with sigmoid calibration.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class _Head:
    """One linear decision and how it becomes a probability: expit(scale * d + shift)."""

    intercept: float
    scale: float
    shift: float


@dataclass(frozen=True)
class LinearTextScorer:
    analyse: Callable[[str], list[str]]
    vocabulary: dict[str, int]
    idf: np.ndarray  # (terms,)
    weights: np.ndarray  # (terms, heads): every head's coefficients, a term's in one row
    heads: tuple[_Head, ...]  # in weights' column order; their probabilities are averaged
    sublinear_tf: bool
    binary: bool
    l2: bool

    @classmethod
    def of(cls, vectorizer: Any, model: Any) -> LinearTextScorer | None:
        """The scorer of a fitted vectorizer and model of a known shape, else None."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        if type(vectorizer) is not TfidfVectorizer or vectorizer.norm not in ("l2", None):
            return None
        heads = _heads(model) if vectorizer.use_idf else None
        terms = len(vectorizer.vocabulary_)
        if not heads or any(w.shape != (terms,) for w, *_ in heads):
            return None
        return cls(
            analyse=vectorizer.build_analyzer(),
            vocabulary=dict(vectorizer.vocabulary_),
            idf=np.asarray(vectorizer.idf_, dtype=np.float64),
            weights=np.ascontiguousarray(np.stack([w for w, *_ in heads], axis=1), np.float64),
            heads=tuple(_Head(*rest) for _, *rest in heads),
            sublinear_tf=bool(vectorizer.sublinear_tf),
            binary=bool(vectorizer.binary),
            l2=vectorizer.norm == "l2",
        )

    def probability(self, text: str) -> float:
        """The probability of class 1, as the model's `predict_proba(...)[:, 1]` gives it."""
        vocabulary = self.vocabulary
        counts = Counter(vocabulary[t] for t in self.analyse(text) if t in vocabulary)
        if counts:
            index = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            if self.binary:
                tf[:] = 1.0
            elif self.sublinear_tf:
                tf = np.log(tf) + 1.0
            values = tf * self.idf[index]
            if self.l2:
                norm = math.sqrt(float(values @ values))
                if norm > 0:
                    values /= norm
            decisions = values @ self.weights[index]
        else:  # no known term: a row of zeros
            decisions = np.zeros(len(self.heads))
        total = sum(
            _expit(head.scale * (float(decision) + head.intercept) + head.shift)
            for head, decision in zip(self.heads, decisions, strict=True)
        )
        return total / len(self.heads)

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        return [self.probability(t) for t in texts]


def _heads(model: Any) -> list[tuple[np.ndarray, float, float, float]] | None:
    """Each linear decision of a binary model: (weights, intercept, scale, shift), its
    probability being expit(scale * decision + shift); None for a model of another shape."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression

    if list(getattr(model, "classes_", [])) != [0, 1]:
        return None
    if type(model) is LogisticRegression:
        return [(model.coef_[0], float(model.intercept_[0]), 1.0, 0.0)]
    if type(model) is not CalibratedClassifierCV or model.method != "sigmoid":
        return None
    heads = []
    for calibrated in model.calibrated_classifiers_:
        estimator, calibrators = calibrated.estimator, calibrated.calibrators
        coef = getattr(estimator, "coef_", None)
        if coef is None or coef.shape[0] != 1 or len(calibrators) != 1:
            return None
        if list(estimator.classes_) != [0, 1]:
            return None
        # scikit-learn's sigmoid calibration: expit(-(a * decision + b))
        a, b = float(calibrators[0].a_), float(calibrators[0].b_)
        heads.append((np.asarray(coef[0]), float(estimator.intercept_[0]), -a, -b))
    return heads


def _expit(z: float) -> float:
    """1 / (1 + e^-z), without overflow at either end."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)
