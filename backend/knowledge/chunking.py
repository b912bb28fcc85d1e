"""Structure-aware chunking: sections stay apart (a chunk never spans two headings or pages),
paragraphs are packed whole while they fit, and what is too long is split at sentences, then
at words, then (for enormous single "words") at characters. Consecutive chunks of one section
overlap by a few words so a fact cut at a boundary is still found.

Sizes are in tokens, counted as the embedding model's tokenizer would roughly count them
(about 1.3 word pieces per English word); the embedder truncates at 256 word pieces, so the
default target of 180 keeps every chunk whole."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from backend.knowledge.extract import Section

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\S+")
MAX_WORD_CHARS = 40  # longer "words" (hashes, base64, a minified line) are cut


@dataclass(frozen=True)
class ChunkText:
    ord: int
    text: str
    heading: str
    page: int | None
    char_start: int  # offsets in the extracted text of the whole document
    char_end: int

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def tokens(text: str) -> int:
    words = _WORD.findall(text)
    return sum(1 + len(w) // 8 for w in words)  # long words split into several word pieces


def chunk(
    sections: list[Section], *, max_tokens: int = 180, overlap_tokens: int = 30
) -> list[ChunkText]:
    chunks: list[ChunkText] = []
    offset = 0
    for section in sections:
        for start, end in _spans(section.text, max_tokens, overlap_tokens):
            body = section.text[start:end].strip()
            if not body:
                continue
            # The nearest heading gives the passage its topic; the whole path ("Guide > Setup >
            # Linux") would make every chunk of a chapter look alike to the embedder.
            nearest = section.heading.rsplit(" > ", 1)[-1]
            text = f"{nearest}\n{body}" if nearest and not body.startswith(nearest) else body
            chunks.append(
                ChunkText(
                    ord=len(chunks),
                    text=text,
                    heading=section.heading,
                    page=section.page,
                    char_start=offset + start,
                    char_end=offset + end,
                )
            )
        offset += len(section.text) + 1
    return chunks


def _spans(text: str, max_tokens: int, overlap: int) -> Iterator[tuple[int, int]]:
    """(start, end) character spans of the chunks of one section: whole units while they fit;
    each chunk after the first starts with the last ~`overlap` tokens of the one before."""
    units = list(_units(text, max_tokens))
    i, carry = 0, None  # carry: (start, tokens) of the tail repeated from the last chunk
    while i < len(units):
        if carry is not None and carry[1] + units[i][2] > max_tokens:
            carry = None  # no room to repeat anything before this unit
        start, size = carry if carry is not None else (units[i][0], 0)
        j = i
        while j < len(units) and (j == i or size + units[j][2] <= max_tokens):
            size += units[j][2]
            j += 1
        yield start, units[j - 1][1]
        if j >= len(units):
            return
        carry = _tail(text, units[j - 1], overlap) if overlap else None
        i = j


def _tail(text: str, unit: tuple[int, int, int], overlap: int) -> tuple[int, int] | None:
    """Where the last `overlap` tokens of a unit start, and how many tokens that is."""
    words = list(_WORD.finditer(text, unit[0], unit[1]))
    size, start = 0, None
    for word in reversed(words):
        cost = 1 + len(word.group()) // 8
        if size + cost > overlap:
            break
        size += cost
        start = word.start()
    return (start, size) if start is not None else None


def _units(text: str, max_tokens: int) -> Iterator[tuple[int, int, int]]:
    """Paragraphs, or the sentences / word runs of a paragraph too long for one chunk, as
    (start, end, tokens)."""
    for para_start, para_end in _split(text, _PARAGRAPH, 0, len(text)):
        paragraph = text[para_start:para_end]
        size = tokens(paragraph)
        if size <= max_tokens:
            if paragraph.strip():
                yield para_start, para_end, size
            continue
        for sent_start, sent_end in _split(text, _SENTENCE, para_start, para_end):
            sentence = text[sent_start:sent_end]
            size = tokens(sentence)
            if size <= max_tokens:
                if sentence.strip():
                    yield sent_start, sent_end, size
                continue
            yield from _word_runs(text, sent_start, sent_end, max_tokens)


def _split(text: str, pattern: re.Pattern[str], start: int, end: int) -> Iterator[tuple[int, int]]:
    position = start
    for match in pattern.finditer(text, start, end):
        yield position, match.start()
        position = match.end()
    yield position, end


def _word_runs(text: str, start: int, end: int, max_tokens: int) -> Iterator[tuple[int, int, int]]:
    run_start, size, last_end = None, 0, start
    for match in _WORD.finditer(text, start, end):
        for piece_start in range(match.start(), match.end(), MAX_WORD_CHARS):
            piece_end = min(piece_start + MAX_WORD_CHARS, match.end())
            cost = 1 + (piece_end - piece_start) // 8
            if run_start is not None and size + cost > max_tokens:
                yield run_start, last_end, size
                run_start, size = None, 0
            if run_start is None:
                run_start = piece_start
            size += cost
            last_end = piece_end
    if run_start is not None:
        yield run_start, last_end, size
