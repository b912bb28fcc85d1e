"""Finds personal data in text and replaces it with a typed placeholder (`[EMAIL]`, `[CARD]`...).

Numbers are validated, not just shaped: a card number must pass Luhn, an IBAN its mod-97 check,
a US social security number the SSA's reserved ranges, so order numbers and dates stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum


class PiiKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    IBAN = "iban"
    US_SSN = "us_ssn"
    UK_NINO = "uk_nino"
    IP_ADDRESS = "ip_address"


@dataclass(frozen=True)
class PiiMatch:
    kind: PiiKind
    start: int
    end: int


_EMAIL = re.compile(r"\b[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63})+\b")
_CARD = re.compile(r"\b\d(?:[ \-]?\d){12,18}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_US_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_UK_NINO = re.compile(
    r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{2,4}(?:[ .\-]?\d{2,4}){1,4}(?!\w)"
)
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _cards(text: str) -> Iterable[tuple[int, int]]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group(0))
        if 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1:
            yield m.span()


def _ibans(text: str) -> Iterable[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        if iban_valid(m.group(0)):
            yield m.span()


def _phones(text: str) -> Iterable[tuple[int, int]]:
    for m in _PHONE.finditer(text):
        candidate = m.group(0)
        digits = re.sub(r"\D", "", candidate)
        separated = bool(re.search(r"[ .\-()]", candidate)) or candidate.startswith("+")
        if 8 <= len(digits) <= 15 and separated and not _DATE_LIKE.match(candidate):
            yield m.span()


def _regex(pattern: re.Pattern[str]) -> Callable[[str], Iterable[tuple[int, int]]]:
    return lambda text: (m.span() for m in pattern.finditer(text))


# Most specific first: a card number is not also reported as a phone number.
_FINDERS: tuple[tuple[PiiKind, Callable[[str], Iterable[tuple[int, int]]]], ...] = (
    (PiiKind.EMAIL, _regex(_EMAIL)),
    (PiiKind.IBAN, _ibans),
    (PiiKind.CARD, _cards),
    (PiiKind.US_SSN, _regex(_US_SSN)),
    (PiiKind.UK_NINO, _regex(_UK_NINO)),
    (PiiKind.IP_ADDRESS, _regex(_IPV4)),
    (PiiKind.PHONE, _phones),
)


def find_pii(text: str, kinds: Iterable[PiiKind] | None = None) -> list[PiiMatch]:
    """Non-overlapping matches of the given kinds (all when None), in text order."""
    wanted = set(kinds) if kinds is not None else set(PiiKind)
    taken: list[PiiMatch] = []
    claimed = bytearray(len(text))  # characters an earlier match holds: linear, not pairwise
    for kind, finder in _FINDERS:
        if kind not in wanted:
            continue
        for start, end in finder(text):
            if claimed.find(1, start, end) == -1:
                claimed[start:end] = b"\x01" * (end - start)
                taken.append(PiiMatch(kind, start, end))
    return sorted(taken, key=lambda m: m.start)


def redact(text: str, matches: list[PiiMatch]) -> str:
    out, last = [], 0
    for m in matches:
        out += [text[last : m.start], f"[{m.kind.name}]"]
        last = m.end
    out.append(text[last:])
    return "".join(out)
