"""Profanity and slurs from a word list (LDNOOBW, shipped in backend/guardrails/data), matched
word by word (a set lookup per word: a 400-word regex alternation costs 10 ms on a long text)."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@cache
def _lexicon() -> tuple[frozenset[str], dict[str, tuple[tuple[str, ...], ...]]]:
    """Single words, and phrases keyed by their first word."""
    text = (files("backend.guardrails") / "data" / "profanity_en.txt").read_text("utf-8")
    singles: set[str] = set()
    phrases: dict[str, list[tuple[str, ...]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words = tuple(_WORD.findall(line.lower()))
        if len(words) == 1:
            singles.add(words[0])
        elif words:
            phrases.setdefault(words[0], []).append(words)
    return frozenset(singles), {k: tuple(v) for k, v in phrases.items()}


def find_profanity(text: str) -> list[tuple[int, int]]:
    singles, phrases = _lexicon()
    words = list(_WORD.finditer(text.lower()))
    spans: list[tuple[int, int]] = []
    skip_to = 0
    for i, word in enumerate(words):
        if i < skip_to:
            continue
        token = word.group(0)
        for phrase in phrases.get(token, ()):
            following = words[i : i + len(phrase)]
            if tuple(w.group(0) for w in following) == phrase:
                spans.append((word.start(), following[-1].end()))
                skip_to = i + len(phrase)
                break
        else:
            if token in singles:
                spans.append(word.span())
    return spans


def mask(text: str, spans: list[tuple[int, int]]) -> str:
    out, last = [], 0
    for start, end in spans:
        out += [text[last:start], text[start] + "*" * (end - start - 1)]
        last = end
    out.append(text[last:])
    return "".join(out)
