"""Cost limits, batching, persisted queries and introspection switches."""

from __future__ import annotations

import hashlib

from httpx import AsyncClient

from backend.config import GraphQLSettings
from backend.graphql.schema import build_schema

QUERY = "{ serverInfo { version } }"
HASH = hashlib.sha256(QUERY.encode()).hexdigest()


async def test_persisted_query_round_trip(client: AsyncClient) -> None:
    ext = {"persistedQuery": {"version": 1, "sha256Hash": HASH}}
    miss = (await client.post("/graphql", json={"extensions": ext})).json()
    assert miss["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    registered = (await client.post("/graphql", json={"query": QUERY, "extensions": ext})).json()
    assert registered["data"]["serverInfo"]["version"]
    hit = (await client.post("/graphql", json={"extensions": ext})).json()
    assert hit["data"] == registered["data"]
    # Over GET too, as CDNs like it.
    import json

    got = await client.get("/graphql", params={"extensions": json.dumps(ext)})
    assert got.json()["data"] == registered["data"]


async def test_persisted_query_with_a_wrong_hash_is_refused(client: AsyncClient) -> None:
    ext = {"persistedQuery": {"version": 1, "sha256Hash": "0" * 64}}
    body = (await client.post("/graphql", json={"query": QUERY, "extensions": ext})).json()
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_batches_run_each_operation_up_to_the_limit(client: AsyncClient) -> None:
    ops = [{"query": QUERY}, {"query": "{ nope }"}]
    results = (await client.post("/graphql", json=ops)).json()
    assert results[0]["data"]["serverInfo"]["version"]
    assert results[1]["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    too_many = await client.post("/graphql", json=[{"query": QUERY}] * 11)
    assert too_many.status_code == 400
    assert too_many.json()["errors"][0]["message"] == "Too many operations"


async def test_cost_limit(client: AsyncClient) -> None:
    expensive = (
        "{ auditEvents(first: 1000) { id event outcome ip createdAt details } "
        "x: auditEvents(first: 1000) { id } }"
    )
    body = (await client.post("/graphql", json={"query": expensive})).json()
    error = body["errors"][0]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert error["extensions"]["cost"] > error["extensions"]["maxCost"] == 5000
    cheap = await client.post("/graphql", json={"query": "{ auditEvents(first: 5) { id } }"})
    assert cheap.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"  # not cost


def test_introspection_is_off_in_production_unless_asked() -> None:
    assert not GraphQLSettings().introspection_enabled(production=True)
    assert GraphQLSettings().introspection_enabled(production=False)
    assert GraphQLSettings(introspection=True).introspection_enabled(production=True)
    schema = build_schema(GraphQLSettings(), production=True)
    result = schema.execute_sync("{ __schema { types { name } } }")
    assert result.errors
