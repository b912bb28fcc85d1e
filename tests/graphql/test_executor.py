"""The schema's executor: subscription events reuse the operation's collected subfields, and
events whose selected fields are plain scalar attributes are answered without execution, with
the same results as graphql-core's executor."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import pytest
import strawberry

from backend.graphql import schema as schema_module


@strawberry.interface
class Event:
    cursor: str


@strawberry.type
class Inner:
    x: int


@strawberry.type
class Token(Event):
    text: str
    number: int = 0
    note: str | None = None
    inner: Inner = strawberry.field(default_factory=lambda: Inner(x=1))

    @strawberry.field
    def upper(self) -> str:
        return self.text.upper()

    @strawberry.field
    def shout(self, times: int) -> str:
        return self.text * times


@strawberry.type
class Failed(Event):
    code: str


@strawberry.type
class Query:
    ok: bool = True


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def events(self, count: int) -> AsyncGenerator[Event, None]:
        for i in range(count):
            yield Token(cursor=str(i), text=f"t{i}") if i % 10 else Failed(cursor=str(i), code="X")


DOCUMENT = (
    "subscription($n: Int!) { events(count: $n) { cursor __typename "
    "... on Token { text } ... on Failed { code } } }"
)


@pytest.mark.parametrize("executor", [None, schema_module.Executor])
async def test_subfields_are_collected_once_per_type_not_per_event(
    executor: type | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    collect = schema_module.collect_subfields

    def counting(*args: Any) -> Any:
        calls.append(str(args[4]))  # the object type
        return collect(*args)

    monkeypatch.setattr(schema_module, "collect_subfields", counting)
    # graphql-core's own executor, for the baseline
    monkeypatch.setattr("graphql.execution.executor.collect_subfields", counting)
    extra = {"execution_context_class": executor} if executor else {}
    built = strawberry.Schema(
        query=Query, subscription=Subscription, types=[Token, Failed], **extra
    )
    stream = await built.subscribe(DOCUMENT, variable_values={"n": 50})
    results = [r async for r in stream]  # type: ignore[union-attr]
    assert [r.data["events"]["cursor"] for r in results] == [str(i) for i in range(50)]
    assert results[1].data["events"] == {"cursor": "1", "__typename": "Token", "text": "t1"}
    assert results[10].data["events"] == {"cursor": "10", "__typename": "Failed", "code": "X"}
    if executor is None:  # what graphql-core does alone: once per event
        assert len(calls) == 50
    else:
        assert sorted(calls) == ["Failed", "Token"]


def test_the_service_schema_uses_it() -> None:
    from backend.config import GraphQLSettings

    built = schema_module.build_schema(GraphQLSettings())
    assert built.execution_context_class is schema_module.Executor


FLAT = [
    (DOCUMENT, {}),
    (
        "subscription($n: Int!) { e: events(count: $n) { c: cursor ...T } } "
        "fragment T on Token { t: text, n: number, kind: __typename }",
        {},
    ),
    (
        "subscription($n: Int!, $f: Boolean!) { events(count: $n) { "
        "... on Token { text number @include(if: $f) cursor @skip(if: $f) } } }",
        {"f": True},
    ),
    (
        "subscription($n: Int!, $f: Boolean!) { events(count: $n) { "
        "... on Token { text number @include(if: $f) cursor @skip(if: $f) } } }",
        {"f": False},
    ),
]
EXECUTED = [
    "subscription($n: Int!) { events(count: $n) { ... on Token { text upper } } }",
    "subscription($n: Int!) { events(count: $n) { ... on Token { text note } } }",
    "subscription($n: Int!) { events(count: $n) { ... on Token { text inner { x } } } }",
    "subscription($n: Int!) { events(count: $n) { ... on Token { shout(times: 2) } } }",
]


async def _events(
    document: str, variables: dict[str, Any], executor: type | None
) -> list[tuple[Any, Any]]:
    extra = {"execution_context_class": executor} if executor else {}
    built = strawberry.Schema(
        query=Query, subscription=Subscription, types=[Token, Failed], **extra
    )
    stream = await built.subscribe(document, variable_values={"n": 30, **variables})
    return [(r.data, r.errors) async for r in stream]  # type: ignore[union-attr]


def _answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The type of each event the plan answered."""
    answered: list[str] = []
    answer = schema_module._FlatPlan.answer

    def counting(self: schema_module._FlatPlan, payload: Any) -> Any:
        result = answer(self, payload)
        if result is not None:
            answered.append(type(payload).__name__)
        return result

    monkeypatch.setattr(schema_module._FlatPlan, "answer", counting)
    return answered


@pytest.mark.parametrize(("document", "variables"), FLAT)
async def test_flat_events_are_answered_without_execution_and_alike(
    document: str, variables: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = await _events(document, variables, None)
    answered = _answers(monkeypatch)
    got = await _events(document, variables, schema_module.Executor)
    assert got == expected
    assert all(errors is None for _, errors in got)
    assert answered.count("Token") == 27  # every Token event (1 in 10 is a Failed)


@pytest.mark.parametrize("document", EXECUTED)
async def test_resolvers_arguments_objects_and_nulls_are_executed(
    document: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = await _events(document, {}, None)
    answered = _answers(monkeypatch)
    got = await _events(document, {}, schema_module.Executor)
    assert got == expected
    assert "Token" not in answered
