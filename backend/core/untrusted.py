"""Input from clients, checked before anything stores it: text that PostgreSQL (UTF-8) can hold,
and JSON parsed with a bound on its nesting. Every entry point (GraphQL scalars, REST forms,
sockets) uses these, so a bad character or a bomb is refused at the edge with a typed error
instead of failing deep inside a query or an encoder."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# PostgreSQL text cannot hold NUL; a lone surrogate is not Unicode (UTF-8 cannot encode it).
# A valid pair never reaches here as two code points: JSON and GraphQL parsers combine pairs.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# A JSON string token, escapes included (unrolled: linear, no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def unstorable_text(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character"
    return "contains a lone surrogate (not valid Unicode)"


def unstorable_json(value: Any) -> str | None:
    """Why a parsed JSON value cannot be stored (a key or string that `unstorable_text`
    refuses), or None. Iterative: the depth was bounded when it was parsed."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            problem = unstorable_text(item)
            if problem:
                return problem
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


class BadJSON(json.JSONDecodeError):
    """JSON the server will not read: malformed, not UTF-8, too deep, or with a number
    Python or PostgreSQL cannot hold. A JSONDecodeError, so every caller that handles
    malformed JSON handles these too."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "", 0)
        self.message = message

    def __str__(self) -> str:
        return self.message


def loads(data: str | bytes, *, max_depth: int, max_values: int) -> Any:
    """Parses JSON (UTF-8 when given bytes) whose arrays and objects nest at most `max_depth`
    deep and that holds at most about `max_values` values. Both are measured before parsing,
    in linear time: a deep document never reaches the recursive parser, and a body of millions
    of tiny values (seconds of parsing, on the event loop) is refused unread. Raises BadJSON."""
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8-sig")  # RFC 8259: a BOM may be ignored
        except UnicodeDecodeError:
            raise BadJSON("the body is not valid UTF-8") from None
    else:
        text = data
    _check_size(text, max_depth, max_values)
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except BadJSON:
        raise
    except json.JSONDecodeError as exc:
        raise BadJSON(f"malformed JSON: {exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of over 4300 digits
        raise BadJSON(f"JSON value out of range: {exc}") from None


def _check_size(text: str, max_depth: int, max_values: int) -> None:
    """Raises BadJSON when JSON `text` nests deeper than `max_depth` or has more than
    `max_values` values (brackets and commas inside strings do not count). In C: no Python
    step per character."""
    openers = text.count("[") + text.count("{")
    if openers <= max_depth and openers + text.count(",") <= max_values:
        return  # most bodies: even counting inside strings, they are within both limits
    # Strings removed (what is left of valid JSON is ASCII); then commas and brackets count.
    rest = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    openers = rest.count(b"[") + rest.count(b"{")
    if openers + rest.count(b",") > max_values:
        raise BadJSON(f"JSON with more than {max_values} values")
    if openers <= max_depth:
        return
    codes = np.frombuffer(rest.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    if int(np.cumsum(steps).max()) > max_depth:
        raise BadJSON(f"JSON nested deeper than {max_depth} levels")


def _refuse_constant(name: str) -> Any:
    raise BadJSON(f"{name} is not JSON")
