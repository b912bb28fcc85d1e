"""Profanity and slurs from a word list (LDNOOBW, shipped in backend/guardrails/data)."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files


@cache
def _pattern() -> re.Pattern[str]:
    text = (files("backend.guardrails") / "data" / "profanity_en.txt").read_text("utf-8")
    words = sorted(
        {w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")},
        key=len,
        reverse=True,
    )
    alternation = "|".join(re.escape(w).replace(r"\ ", r"[\s\-_]+") for w in words)
    return re.compile(rf"(?<![A-Za-z])(?:{alternation})(?![A-Za-z])", re.IGNORECASE)


def find_profanity(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _pattern().finditer(text)]


def mask(text: str, spans: list[tuple[int, int]]) -> str:
    out, last = [], 0
    for start, end in spans:
        out += [text[last:start], text[start] + "*" * (end - start - 1)]
        last = end
    out.append(text[last:])
    return "".join(out)
