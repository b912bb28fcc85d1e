"""The schema's executor: subscription events reuse the operation's collected subfields."""

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
class Token(Event):
    text: str


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
