"""Embedders that fail on purpose (the real one, `embedder`, is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Sequence

from backend.knowledge.embeddings import EmbeddingUnavailable, LocalEmbedder
from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401 (accounts, LLM stub)


class FlakyEmbedder:
    """Fails `failures` calls (then works by delegating), or always when `failures` < 0."""

    def __init__(self, inner: LocalEmbedder, failures: int, fail_after: int = 0) -> None:
        self.name = inner.name
        self.dimensions = inner.dimensions
        self._inner = inner
        self.failures = failures
        self.fail_after = fail_after  # calls that succeed before the failures begin
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        if self.calls > self.fail_after and (self.failures < 0 or self.failures > 0):
            self.failures -= 1 if self.failures > 0 else 0
            raise EmbeddingUnavailable("the embedding endpoint is down")
        return await self._inner.embed(texts)

    async def aclose(self) -> None:
        return None
