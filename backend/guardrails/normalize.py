# ruff: noqa: RUF001  (the homoglyph table is made of look-alike letters on purpose)
"""Undoes the usual disguises of an attack before any rail reads a text: Unicode compatibility
forms, invisible characters, homoglyphs from other scripts, leetspeak, letters spaced apart,
and payloads encoded as base64. Rails read every variant; a hit on any of them counts."""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass, field

# Zero-width, joiners, bidi controls, soft hyphen, BOM, word joiner, tag characters.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\u3164\ufeff\uffa0\U000e0000-\U000e007f]"
)
# Letters of other scripts that look like Latin ones (Unicode's confusables, the common part).
_HOMOGLYPHS = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o",
        "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i",
        "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l",
        "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
        "С": "C", "Т": "T", "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ԁ": "D",
        # Greek
        "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "χ": "x",
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
        "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
        # Latin look-alikes outside ASCII
        "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ʏ": "y", "ℓ": "l",
    }
)  # fmt: skip
_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
     "!": "i", "|": "l", "+": "t"}
)  # fmt: skip
_LEET_WORD = re.compile(r"\b(?=[a-z0-9@$!|+]*[a-z])(?=[a-z0-9@$!|+]*[0-9@$!|+])[a-z0-9@$!|+]{3,}")
_SPACED = re.compile(r"\b(?:[A-Za-z](?:[.\-_*]|\s{1,3})){3,}[A-Za-z]\b")
_SINGLE_GAP = re.compile(r"(?<=[A-Za-z])[ .\-_*](?=[A-Za-z])")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Normalised:
    text: str  # the canonical form rails read first
    variants: tuple[str, ...]  # other readings (leetspeak undone, a decoded payload...)
    signals: frozenset[str] = field(default_factory=frozenset)  # "invisible", "mixed_scripts"...

    @property
    def readings(self) -> tuple[str, ...]:
        return (self.text, *self.variants)


def strip_invisible(text: str) -> str:
    return _INVISIBLE.sub("", text)


def normalise(text: str, *, max_chars: int = 20_000) -> Normalised:
    """The text as a rail should read it, and the other ways it can be read."""
    signals: set[str] = set()
    text = text[:max_chars]
    visible = strip_invisible(text)
    if len(visible) != len(text):
        signals.add("invisible")
    folded = unicodedata.normalize("NFKC", visible)
    if folded != visible:
        signals.add("compatibility_forms")
    latin = folded.translate(_HOMOGLYPHS)
    if latin != folded and _mixes_scripts(folded):
        signals.add("mixed_scripts")
    canonical = _WHITESPACE.sub(" ", latin).strip()
    spaced = [m.group(0) for m in _SPACED.finditer(latin)]

    variants: list[str] = []
    lower = canonical.lower()
    unleet = _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), lower)
    if unleet != lower:
        signals.add("leetspeak")
        variants.append(unleet)
    if spaced:
        # "i g n o r e   a l l": one separator between letters, more between words
        signals.add("spaced_letters")
        joined = _SPACED.sub(lambda m: _SINGLE_GAP.sub("", m.group(0)), latin)
        variants.append(_WHITESPACE.sub(" ", joined).strip())
        variants.append("".join(ch for ch in "".join(spaced).lower() if ch.isalpha()))
    for decoded in _decoded_payloads(canonical):
        signals.add("encoded")
        variants.append(decoded)
    return Normalised(canonical, tuple(variants), frozenset(signals))


def _mixes_scripts(text: str) -> bool:
    """Whether one word holds Latin letters and letters of another script (a homoglyph trick)."""
    for word in text.split():
        scripts = {unicodedata.name(ch, "?").split(" ", 1)[0] for ch in word if ch.isalpha()}
        if "LATIN" in scripts and len(scripts) > 1:
            return True
    return False


def _decoded_payloads(text: str, limit: int = 4) -> list[str]:
    found: list[str] = []
    for match in _BASE64.finditer(text):
        blob = match.group(0)
        try:
            raw = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
        if decoded and printable / len(decoded) > 0.95 and " " in decoded:
            found.append(decoded)
            if len(found) >= limit:
                break
    return found
