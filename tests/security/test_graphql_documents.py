"""Documents built to exhaust the server: refused early, in time linear in their size, off the
event loop and within a time budget; the server answers other requests meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from graphql import ValidationContext, ValidationRule, parse
from httpx import AsyncClient

from backend.config import GraphQLSettings
from backend.graphql.limits import measure_document
from backend.graphql.schema import build_schema
from backend.graphql.validation import VALIDATION_THREADS, DocumentValidator


def fan_out(levels: int) -> str:
    """Each fragment spreads the one before twice: 2**levels fields once expanded."""
    fragments = ["fragment F0 on ServerInfo { version }"] + [
        f"fragment F{i} on ServerInfo {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, levels + 1)
    ]
    return f"{{ serverInfo {{ ...F{levels} }} }}\n" + "\n".join(fragments)


def fan_out_in_depth(levels: int) -> str:
    """Each fragment spreads the one before under two fields: a result tree of 2**levels."""
    fragments = ["fragment F0 on ServerInfo { version }"] + [
        f"fragment F{i} on Query {{ a: serverInfo {{ version }} b: serverInfo {{ version }} "
        f"...F{i - 1} }}"
        for i in range(1, levels + 1)
    ]
    return "\n".join(fragments)


async def post(client: AsyncClient, query: str, **body: Any) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, **body})
    assert response.status_code in (200, 400), response.text
    return response.json()


@pytest.mark.parametrize("levels", [20, 39, 60])
async def test_fragment_fan_out_is_refused_while_the_server_answers(
    client: AsyncClient, levels: int
) -> None:
    # Strawberry's own depth limiter took 13.8 s at 20 levels and never finished at 39.
    attack = asyncio.create_task(post(client, fan_out(levels)))
    health = await client.get("/healthz")
    assert health.status_code == 200
    body = await attack
    codes = {error["extensions"]["code"] for error in body["errors"]}
    assert codes == {"GRAPHQL_VALIDATION_FAILED"}
    costs = [e["extensions"] for e in body["errors"] if "cost" in e["extensions"]]
    assert costs
    assert costs[0]["cost"] >= 2**levels or costs[0]["cost"] >= 10**15
    assert (await post(client, "{ serverInfo { version } }"))["data"]["serverInfo"]["version"]


def test_measures_visit_each_fragment_once() -> None:
    document = parse(fan_out(200), max_tokens=None)
    (measure,) = measure_document(document).values()
    assert measure.cost == 10**15  # saturated, not 2**200 computed by walking every spread
    assert measure.depth == 1
    deep = parse(
        fan_out_in_depth(12) + "\nquery Q { serverInfo { version } ...F12 }", max_tokens=None
    )
    (measure,) = measure_document(deep).values()
    assert measure.cost == 1 + 1 + 12 * 4 + 1  # serverInfo+version, 12 x (2 x 2), F0's version
    assert measure.breadth == 1 + 12 * 2 + 1  # the root gathers every fragment's fields


async def test_a_fragment_chain_too_deep_to_recurse_is_measured() -> None:
    # A chain of fragments, each spreading the next, deeper than Python's recursion limit.
    links = 3000
    text = "{ serverInfo { ...F0 } }\n" + "\n".join(
        f"fragment F{i} on ServerInfo {{ ...F{i + 1} }}" for i in range(links)
    )
    text += f"\nfragment F{links} on ServerInfo {{ version }}"
    (measure,) = measure_document(parse(text, max_tokens=None)).values()
    assert measure.cost == 2
    schema = build_schema(GraphQLSettings(max_tokens=100_000))
    validator = DocumentValidator([], budget_s=60)
    errors = await validator.validate(schema._schema, parse(text, max_tokens=None), None)
    assert all(error.extensions["code"] == "GRAPHQL_VALIDATION_FAILED" for error in errors)


@pytest.mark.parametrize(
    ("query", "limit"),
    [
        (
            "{ serverInfo { " + " ".join("features { name }" for _ in range(101)) + " } }",
            "maxBreadth",
        ),
        ("{ serverInfo " + "{ features " * 13 + "{ name }" + " }" * 13 + " }", "maxDepth"),
        ("{ " + " ".join(f"a{i}: serverInfo {{ version }}" for i in range(31)) + " }", None),
    ],
    ids=["breadth", "depth", "aliases"],
)
async def test_limits_refuse_with_their_figures(
    client: AsyncClient, query: str, limit: str | None
) -> None:
    body = await post(client, query)
    (error,) = body["errors"]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    if limit is not None:
        assert error["extensions"][limit] < error["extensions"][limit.replace("max", "").lower()]


async def test_many_fields_to_compare_are_refused_by_the_merge_budget(client: AsyncClient) -> None:
    # Within every limit, but merging 30 copies of a 48-field selection is ~1M comparisons.
    inner = " ".join("name" for _ in range(48))
    query = "{ serverInfo { " + " ".join(f"features {{ {inner} }}" for _ in range(30)) + " } }"
    (error,) = (await post(client, query))["errors"]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "too complex to validate" in error["message"]


class _Spin(ValidationRule):
    """A rule that never ends by itself; records whether its thread was interrupted."""

    started = threading.Event()
    stopped = threading.Event()

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)
        type(self).started.set()
        try:
            while True:
                pass
        finally:
            type(self).stopped.set()


async def test_validation_runs_off_the_loop_and_is_interrupted_past_its_budget() -> None:
    schema = build_schema(GraphQLSettings())._schema
    validator = DocumentValidator([_Spin], budget_s=0.5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    try:
        errors = await validator.validate(schema, parse("{ serverInfo { version } }"), "q")
    finally:
        ticking.cancel()
    (error,) = errors
    assert error.extensions["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "to validate" in error.message
    assert ticks > 0  # the loop kept running while the rule spun
    if _Spin.started.is_set():  # on a very busy machine the job may be dropped before it starts
        assert await asyncio.to_thread(_Spin.stopped.wait, 60)
    # The pool thread is free again: a document validates normally afterwards.
    plain = DocumentValidator([], budget_s=60)
    assert await plain.validate(schema, parse("{ serverInfo { version } }"), None) == []


async def test_a_document_with_several_operations_must_name_one(client: AsyncClient) -> None:
    text = "query A { serverInfo { version } } query B { serverInfo { environment } }"
    (error,) = (await post(client, text))["errors"]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "operationName" in error["message"]
    named = await post(client, text, operationName="B")
    assert named["data"] == {"serverInfo": {"environment": "test"}}
    unknown = (await post(client, text, operationName="C"))["errors"][0]
    assert unknown["extensions"]["code"] == "BAD_REQUEST"  # HTTP 400: no such operation


async def test_an_undefined_fragment_is_a_typed_error(client: AsyncClient) -> None:
    (error,) = (await post(client, "{ serverInfo { ...Nope } }"))["errors"]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert error["message"] == "Unknown fragment 'Nope'."


class _Nap(ValidationRule):
    """A rule that waits without using the CPU (as a thread does behind a busy CPU)."""

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)
        time.sleep(1.5)


async def test_the_budget_is_cpu_time_not_time_spent_waiting() -> None:
    """Waiting for a loaded CPU, or in the pool's queue behind other documents, is not the
    document's cost: a budget of wall time refused cheap documents on a busy machine."""
    schema = build_schema(GraphQLSettings())._schema
    napping = DocumentValidator([_Nap], budget_s=1.0)
    cheap = DocumentValidator([], budget_s=1.0)
    document = parse("{ serverInfo { version } }")
    results = await asyncio.gather(
        *(napping.validate(schema, document, None) for _ in range(VALIDATION_THREADS)),
        cheap.validate(schema, document, None),  # queued behind the naps: 1.5 s at least
    )
    assert results == [[]] * (VALIDATION_THREADS + 1)
