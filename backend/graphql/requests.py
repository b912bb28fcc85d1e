"""The shape of a GraphQL request over HTTP, checked before Strawberry reads it: an operation
is a JSON object whose `query` and `operationName` are strings and whose `variables` and
`extensions` are objects; a batch is a list of such objects; a multipart upload's `map` names
places that exist. Anything else is a 400 with the reason, never an exception deep inside."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cross_web import HTTPException

_STRINGS = ("query", "operationName")
_OBJECTS = ("variables", "extensions")


def check_operations(data: object) -> None:
    """Raises HTTPException(400) unless `data` is an operation or a list of them."""
    if isinstance(data, list):
        if not data:
            raise HTTPException(400, "a batch must hold at least one operation")
        for i, item in enumerate(data):
            _check_operation(item, f"operation {i}: ")
        return
    _check_operation(data, "")


def _check_operation(item: object, where: str) -> None:
    if not isinstance(item, dict):
        raise HTTPException(
            400,
            f"{where}a GraphQL request is a JSON object (a batch: a list of objects), "
            f"not {_json_kind(item)}",
        )
    for key in _STRINGS:
        if not isinstance(item.get(key), str | None):
            raise HTTPException(400, f"{where}`{key}` must be a string or null")
    for key in _OBJECTS:
        if not isinstance(item.get(key), dict | None):
            raise HTTPException(400, f"{where}`{key}` must be an object or null")


def place_files(operations: object, files_map: object, files: Mapping[str, Any]) -> Any:
    """The multipart request spec: each file goes where `map` says (`{"0": ["variables.f"]}`).

    Only inside an operation's `variables`, through objects and list indexes that exist;
    anything else (a path through a string, say) is a 400 saying which path is wrong.
    Edits `operations` in place (it was parsed for this request alone).
    """
    check_operations(operations)
    if not isinstance(files_map, dict):
        raise HTTPException(400, "`map` must be an object of file names to lists of paths")
    for name, paths in files_map.items():
        if name not in files:
            raise HTTPException(400, f"the file {name!r} named in `map` is missing")
        if isinstance(files[name], str | bytes):  # a part without a file name: a plain field
            raise HTTPException(400, f"the part {name!r} named in `map` is not a file")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise HTTPException(400, f"`map` of {name!r} must be a list of paths")
        for path in paths:
            _place(operations, path, files[name])
    return operations


def _place(operations: Any, path: str, file: Any) -> None:
    keys = path.split(".")
    if isinstance(operations, list):  # a batch: the path starts with the operation's index
        first = keys.pop(0)
        target = _step(operations, first, path)
    else:
        target = operations
    if len(keys) < 2 or keys[0] != "variables":
        raise HTTPException(400, f"`map` path {path!r} must point into `variables`")
    *parents, last = keys
    for key in parents:
        target = _step(target, key, path)
    if isinstance(target, dict):
        target[last] = file  # clients send a null placeholder; one without is as good
    elif isinstance(target, list):
        target[_index(target, last, path)] = file
    else:
        raise HTTPException(400, f"`map` path {path!r} goes through {_json_kind(target)}")


def _step(target: Any, key: str, path: str) -> Any:
    if isinstance(target, dict):
        if key not in target:
            raise HTTPException(400, f"`map` path {path!r}: no {key!r} there")
        return target[key]
    if isinstance(target, list):
        return target[_index(target, key, path)]
    raise HTTPException(400, f"`map` path {path!r} goes through {_json_kind(target)}")


def _index(items: list[Any], key: str, path: str) -> int:
    if not key.isascii() or not key.isdigit() or int(key) >= len(items):
        raise HTTPException(400, f"`map` path {path!r}: {key!r} is not an index of that list")
    return int(key)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
