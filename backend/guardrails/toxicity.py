"""Toxicity beyond the word list: the packaged classifier of `alt-profanity-check` (a linear SVM
over word n-gram TF-IDF, calibrated, fitted by its authors on about 200,000 human-labelled
comments; MIT; the model ships inside the wheel), scored sentence by sentence, the message's
score being its most offensive sentence's. It reads sentences, not words: "you are a
worthless idiot" scores high with no listed word in it, "how do I kill a zombie process" low.

Scored with the model's own numbers (`backend.guardrails.linear`): a few microseconds a
sentence here, against 1.45 ms through scikit-learn's `predict_proba` for one short sentence. It
runs with the other local rails, in their thread, and on each held-back chunk of an answer
(`output.toxicity`). `bench/toxicity.py` measures it against
the word list on hand-written rows and ordinary text.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

from backend.guardrails.linear import LinearTextScorer

# where a sentence ends: after . ! ? or a line break (a list item, a line of a message)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
MAX_SENTENCES = 200  # a long text's first sentences (the length rail caps messages anyway)
PACKAGE = "profanity_check"  # the import name of alt-profanity-check


@cache
def _model() -> tuple[Any, Any]:
    """The vectorizer and the classifier, loaded once from the package's files (found without
    importing it: its import loads them at module level, on whichever thread imports it)."""
    import joblib

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the toxicity classifier is missing: alt-profanity-check")
    folder = Path(spec.origin).parent / "data"
    return joblib.load(folder / "vectorizer.joblib"), joblib.load(folder / "model.joblib")


@cache
def _scorer() -> LinearTextScorer | None:
    """The classifier as plain arithmetic; None if a new package version changed its shape."""
    return LinearTextScorer.of(*_model())


def warm() -> None:
    score("warm up")


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE.split(text)) if s][:MAX_SENTENCES]


def score(text: str) -> float:
    """The probability that the most offensive sentence of `text` is offensive (0 for none)."""
    parts = sentences(text)
    if not parts:
        return 0.0
    scorer = _scorer()
    if scorer is not None:
        return max(scorer.probabilities(parts))
    vectorizer, model = _model()
    return float(model.predict_proba(vectorizer.transform(parts))[:, 1].max())
