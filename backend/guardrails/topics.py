"""Topical rails: a message is compared, by embedding similarity, with a tenant's allowed and
denied topics (short descriptions such as "billing and invoices")."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class TextEmbedder(Protocol):
    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


@dataclass(frozen=True)
class TopicMatch:
    denied: str | None  # the denied topic the message is about
    off_topic: bool  # allowed topics are set and the message is near none of them
    best_allowed: float


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


class TopicMatcher:
    def __init__(self, embedder: TextEmbedder, cache_size: int = 512) -> None:
        self._embedder = embedder
        self.model_name: str | None = getattr(embedder, "name", None)  # `model@version`
        self._cache: OrderedDict[str, list[float]] = OrderedDict()
        self._cache_size = cache_size

    async def _vectors(self, texts: Sequence[str]) -> list[list[float]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, vector in zip(missing, await self._embedder.embed(missing), strict=True):
                self._cache[text] = vector
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return [self._cache[t] for t in texts]

    async def warm(self, topics: Sequence[str] = ()) -> None:
        """Loads the embedder and caches the vectors of `topics` (the default policy's), so
        that the first check pays neither."""
        await self._embedder.embed(["warm up"])
        await self._vectors(list(dict.fromkeys(topics)))

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """The vectors of these texts, embedded now (not cached)."""
        return await self._embedder.embed(list(texts))

    async def similarities(
        self, texts: Sequence[str], candidates: Sequence[str]
    ) -> list[list[float]]:
        """Cosine similarity of each text (embedded now) with each candidate (cached)."""
        import numpy as np

        if not texts or not candidates:
            return [[] for _ in texts]
        fresh = np.asarray(await self._embedder.embed(list(texts)), dtype=np.float32)
        known = np.asarray(await self._vectors(candidates), dtype=np.float32)
        fresh /= np.maximum(np.linalg.norm(fresh, axis=1, keepdims=True), 1e-12)
        known /= np.maximum(np.linalg.norm(known, axis=1, keepdims=True), 1e-12)
        return (fresh @ known.T).tolist()  # type: ignore[no-any-return]

    async def match(
        self, text: str, allowed: Sequence[str], denied: Sequence[str], threshold: float
    ) -> TopicMatch:
        [message] = await self._embedder.embed([text])
        denied_vectors = await self._vectors(denied)
        for topic, vector in zip(denied, denied_vectors, strict=True):
            if _cosine(message, vector) >= threshold:
                return TopicMatch(denied=topic, off_topic=False, best_allowed=0.0)
        if not allowed:
            return TopicMatch(denied=None, off_topic=False, best_allowed=1.0)
        best = max(_cosine(message, v) for v in await self._vectors(allowed))
        return TopicMatch(denied=None, off_topic=best < threshold, best_allowed=best)
