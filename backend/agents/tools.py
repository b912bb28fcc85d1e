"""The tools the agent may call, injected by the app: the knowledge base and the vision service
fill these interfaces; an absent tool is simply not offered to the model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.auth.principal import Principal
from backend.inference.llm.base import ToolSpec


@dataclass(frozen=True)
class Source:
    """One retrieved passage: what the answer may cite."""

    chunk_id: str
    document_id: str
    title: str
    text: str
    score: float
    span: dict[str, Any] = field(default_factory=dict)  # page, heading path, offsets


class KnowledgeSearch(Protocol):
    async def __call__(self, principal: Principal, query: str, k: int) -> list[Source]:
        """The caller's tenant's best passages for `query` (tenant-scoped by the caller)."""
        ...


class ImageAnalysis(Protocol):
    async def __call__(self, principal: Principal, attachment_id: str) -> dict[str, Any]:
        """OCR text, detections and classes of one of the caller's uploaded images."""
        ...


class SourceSimilarity(Protocol):
    async def __call__(
        self, principal: Principal, texts: list[str], chunk_ids: list[str]
    ) -> list[dict[str, float]]:
        """Cosine similarity of each text to each of the caller's chunks: {chunk id: sim}."""
        ...


@dataclass(frozen=True)
class AgentTools:
    search_knowledge: KnowledgeSearch | None = None
    analyze_image: ImageAnalysis | None = None
    # Whether the caller's tenant has anything to search (None: assume so). Saves a query
    # embedding, and tool noise in the stream, for tenants without documents.
    has_knowledge: Callable[[Principal], Awaitable[bool]] | None = None
    # Whether a message is close enough to the caller's knowledge base to retrieve for it
    # (None: always). Models without tool calling get passages in their prompt only then.
    is_relevant: Callable[[Principal, str], Awaitable[bool]] | None = None
    # How close an answer's sentences come to its sources (None: answers that cite no
    # source as [n] get no citations attributed to them).
    similarity: SourceSimilarity | None = None

    async def knowledge_for(self, principal: Principal) -> bool:
        if self.search_knowledge is None:
            return False
        return self.has_knowledge is None or await self.has_knowledge(principal)

    async def retrieve_for(self, principal: Principal, message: str) -> bool:
        """Whether to search before the model answers (for models without tool calling)."""
        if not await self.knowledge_for(principal):
            return False
        return self.is_relevant is None or await self.is_relevant(principal, message)

    async def specs(self, principal: Principal) -> list[ToolSpec]:
        specs = []
        if await self.knowledge_for(principal):
            specs.append(SEARCH_KNOWLEDGE)
        # analyze_image is not offered: the agent analyses a message's attachments itself,
        # before the model answers, whether the model can call tools or not
        return specs


SEARCH_KNOWLEDGE = ToolSpec(
    name="search_knowledge",
    description="Search the organisation's documents. Returns numbered sources to cite as [n].",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string", "description": "What to look for."}},
        "required": ["query"],
    },
)
