"""Citations of an answer: the `[n]` markers the model wrote, or, for an answer that cites
nothing (small models rarely do), each sentence attributed to the source it is most similar
to, when at least as similar as a threshold. The similarity is the knowledge base's (the
sentences embedded by its embedder, compared with the chunks' stored embeddings)."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

from backend.agents.tools import Source, SourceSimilarity
from backend.auth.principal import Principal
from backend.config import ChatSettings

log = logging.getLogger(__name__)

# A sentence ends at . ! or ? followed by white space (or the end), or at a line break; a
# decimal point (3.5) or a dotted name (example.com) does not end one.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n+")
_WORD = re.compile(r"\w+")
MIN_WORDS = 3  # "Sure." or "Yes, it is." says nothing a source could back


@dataclass(frozen=True)
class Sentence:
    start: int  # character offsets in the answer
    end: int
    text: str


def citation(
    source: dict[str, Any], start: int, end: int, *, confidence: float, explicit: bool
) -> dict[str, Any]:
    """A CitationAdded event's body (and what the answer's message stores)."""
    return {
        "index": source["n"],
        "chunkId": source["chunk_id"],
        "documentId": source["document_id"],
        "title": source["title"],
        "answerStart": start,
        "answerEnd": end,
        "span": source.get("span", {}),
        "confidence": confidence,
        "explicit": explicit,
    }


def numbered(sources: list[Source], start: int = 1) -> list[dict[str, Any]]:
    """Sources as a turn keeps them: numbered from `start`, as the prompt lists them."""
    return [
        {
            "n": start + i,
            "chunk_id": s.chunk_id,
            "document_id": s.document_id,
            "title": s.title,
            "text": s.text,
            "score": s.score,
            "span": s.span,
        }
        for i, s in enumerate(sources)
    ]


def sentences(answer: str, limit: int) -> list[Sentence]:
    """The answer's first `limit` sentences of at least MIN_WORDS words (one pass)."""
    found: list[Sentence] = []
    start = 0
    for match in _SENTENCE_END.finditer(answer):
        _add(found, answer, start, match.end())
        start = match.end()
        if len(found) >= limit:
            return found
    _add(found, answer, start, len(answer))
    return found[:limit]


def _add(found: list[Sentence], answer: str, start: int, end: int) -> None:
    piece = answer[start:end]
    stripped = piece.strip()
    if len(_WORD.findall(stripped)) < MIN_WORDS:
        return
    begin = start + len(piece) - len(piece.lstrip())
    found.append(Sentence(begin, begin + len(stripped), stripped))


async def attribute(
    principal: Principal,
    answer: str,
    sources: list[dict[str, Any]],
    similarity: SourceSimilarity,
    *,
    threshold: float,
    max_sentences: int,
) -> list[dict[str, Any]]:
    """One citation per sentence that is at least `threshold` similar to a source (its most
    similar one), with the similarity as its confidence; in the answer's order."""
    parts = sentences(answer, max_sentences)
    numbered: dict[str, dict[str, Any]] = {}
    for source in sources:
        numbered.setdefault(str(source["chunk_id"]), source)  # a chunk found twice: its first n
    if not parts or not numbered:
        return []
    scores = await similarity(principal, [p.text for p in parts], list(numbered))
    found = []
    for part, similar in zip(parts, scores, strict=True):
        if not similar:
            continue
        # the most similar source; between equals, the one listed first
        best = max(numbered, key=lambda c: (similar.get(c, -2.0), -numbered[c]["n"]))
        if best not in similar or similar[best] < threshold:
            continue
        found.append(
            citation(
                numbered[best],
                part.start,
                part.end,
                confidence=round(similar[best], 4),
                explicit=False,
            )
        )
    return found


async def attributed(
    principal: Principal,
    answer: str,
    sources: list[dict[str, Any]],
    similarity: SourceSimilarity,
    settings: ChatSettings,
    *,
    what: str,
) -> list[dict[str, Any]]:
    """`attribute` with the chat settings' threshold and limits, for an answer that cites none
    of its sources: nothing when attribution is off (a threshold above 1), when there is
    nothing to attribute, or when it fails or outlives `citation_timeout_s` (logged under
    `what`; an answer without citations, never a failed answer)."""
    if settings.citation_threshold > 1 or not sources or not answer.strip():
        return []
    try:
        async with asyncio.timeout(settings.citation_timeout_s):
            return await attribute(
                principal,
                answer,
                sources,
                similarity,
                threshold=settings.citation_threshold,
                max_sentences=settings.citation_max_sentences,
            )
    except TimeoutError:
        log.warning(
            "%s: attribution took over %ss; the answer has no citations",
            what,
            settings.citation_timeout_s,
        )
    except Exception as exc:
        log.warning("%s: attribution failed (%r); the answer has no citations", what, exc)
    return []
