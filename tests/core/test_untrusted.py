"""Client input checks on their own: storable text, bounded JSON."""

from __future__ import annotations

import json

import pytest

from backend.core.untrusted import BadJSON, loads, unstorable_json, unstorable_text

LIMITS = {"max_depth": 5, "max_values": 1000}


def test_text_postgresql_cannot_store() -> None:
    assert unstorable_text("plain, ünïcode and 😀") is None
    assert unstorable_text("a\x00b") == "contains a NUL character"
    assert "surrogate" in (unstorable_text("a\ud800") or "")
    assert "surrogate" in (unstorable_text("\udfff") or "")
    assert unstorable_json({"k": ["ok", {"deep": "fine"}]}) is None
    assert unstorable_json({"k": ["ok", {"deep": "a\x00"}]}) == "contains a NUL character"
    assert unstorable_json({"\ud800": 1}) is not None


def test_depth_counts_structure_not_brackets_in_strings() -> None:
    assert loads('{"a": [[["[[[[[[[[[[{{{{{{{{"]]]}', **LIMITS) == {"a": [[["[[[[[[[[[[{{{{{{{{"]]]}
    escaped = r'{"a": "\"[[[[[[[[[[\\", "b": [1]}'
    assert loads(escaped, **LIMITS) == json.loads(escaped)
    assert loads("[" * 5 + "]" * 5, **LIMITS) == [[[[[]]]]]
    with pytest.raises(BadJSON, match="deeper than 5"):
        loads("[" * 6 + "]" * 6, **LIMITS)
    with pytest.raises(BadJSON, match="deeper than 5"):
        loads('{"a":' * 6 + "1" + "}" * 6, **LIMITS)
    # many shallow containers are fine; one deep branch among them is not
    wide = "[" + ",".join(["[[1]]"] * 200) + "]"
    assert len(loads(wide, **LIMITS)) == 200
    with pytest.raises(BadJSON, match="deeper"):
        loads("[" + ",".join(["[[1]]"] * 200 + ["[[[[[[1]]]]]]"]) + "]", **LIMITS)


def test_bombs_are_refused_before_parsing() -> None:
    with pytest.raises(BadJSON, match="deeper"):
        loads(b"[" * 1_000_000 + b"]" * 1_000_000, max_depth=64, max_values=10**9)
    with pytest.raises(BadJSON, match="more than 1000 values"):
        loads("[" + "0," * 5000 + "0]", **LIMITS)
    # commas inside strings are not values
    assert loads(json.dumps(["," * 5000]), **LIMITS) == ["," * 5000]


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b'"\xed\xa0\x80"', b"NaN", b"[Infinity]", b"-Infinity", b"1" * 5000, b"{", b""],
)
def test_what_is_not_json_is_bad_json(raw: bytes) -> None:
    with pytest.raises(BadJSON) as refused:
        loads(raw, **LIMITS)
    assert isinstance(refused.value, json.JSONDecodeError)  # callers that handle one handle both
    assert str(refused.value)


def test_a_bom_is_ignored_and_escapes_still_parse() -> None:
    assert loads(b'\xef\xbb\xbf{"a": 1}', **LIMITS) == {"a": 1}
    assert loads(b'"\\ud83d\\ude00"', **LIMITS) == "😀"  # a pair, combined
    assert loads(b'"\\ud800"', **LIMITS) == "\ud800"  # parsed; refused where it is stored
