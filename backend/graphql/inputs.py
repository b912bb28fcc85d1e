"""Every string an operation brings (variables at any depth, JSON keys, upload file names, and
the string literals of its document) must be text PostgreSQL can store: no NUL, no lone
surrogate. Checked once per operation, before anything runs, for every transport, instead of
field by field; a bad one is BAD_USER_INPUT naming where it was."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from graphql import DocumentNode, Node, StringValueNode
from strawberry.extensions import SchemaExtension

from backend.core.untrusted import unstorable_text
from backend.errors import ValidationFailed


class StorableInput(SchemaExtension):
    def on_execute(self) -> Iterator[None]:
        ctx = self.execution_context
        if ctx.variables:
            _check_variables(ctx.variables)
        if ctx.graphql_document is not None:
            _check_literals(ctx.graphql_document)
        yield


def _check_variables(variables: dict[str, Any]) -> None:
    """Walks the variables iteratively (the JSON body's depth is already bounded)."""
    pending: list[tuple[str, Any]] = [(f"${name}", value) for name, value in variables.items()]
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            _refuse(where, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _refuse(f"{where} (a key)", str(key))
                pending.append((f"{where}.{key}", item))
        elif isinstance(value, list):
            pending.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(filename := getattr(value, "filename", None), str):  # an upload
            _refuse(f"{where} (its file name)", filename)


def _check_literals(document: DocumentNode) -> None:
    """The document's string literals: arguments, default values, list and object fields."""
    pending: list[Any] = list(document.definitions)
    while pending:
        node = pending.pop()
        if isinstance(node, StringValueNode):
            loc = node.loc.source.get_location(node.loc.start) if node.loc else None
            _refuse(f"the string at {loc.line}:{loc.column}" if loc else "a string", node.value)
            continue
        for key in node.keys:
            child = getattr(node, key, None)
            if isinstance(child, tuple | list):
                pending.extend(c for c in child if isinstance(c, Node))
            elif isinstance(child, Node):
                pending.append(child)


def _refuse(where: str, text: str) -> None:
    problem = unstorable_text(text)
    if problem:
        raise ValidationFailed(f"{where} {problem}", field=where)
