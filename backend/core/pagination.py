"""Keyset pagination with opaque cursors (Relay connections), for any ordered query."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from backend.errors import ValidationFailed

T = TypeVar("T")
MAX_PAGE = 100


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    cursors: list[str]
    has_next: bool

    @property
    def end_cursor(self) -> str | None:
        return self.cursors[-1] if self.cursors else None


def encode(kind: str, *values: Any) -> str:
    raw = json.dumps([kind, *values], separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(cursor: str, kind: str, arity: int) -> list[Any]:
    """The key values in a cursor of `kind`; anything else is a BAD_USER_INPUT."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ValidationFailed("malformed cursor", field="after") from None
    if not isinstance(values, list) or len(values) != arity + 1 or values[0] != kind:
        raise ValidationFailed("cursor is not from this list", field="after")
    return values[1:]


def page_size(first: int) -> int:
    if not 1 <= first <= MAX_PAGE:
        raise ValidationFailed(f"first must be 1 to {MAX_PAGE}", field="first")
    return first
