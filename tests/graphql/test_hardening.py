"""Cost limits, batching, persisted queries and introspection switches."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
from httpx import ASGITransport, AsyncClient
from redis.asyncio import Redis

from backend.app import create_app
from backend.config import Environment, GraphQLSettings, Settings
from backend.core.db import Database
from tests.conftest import lifespan

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


async def test_introspection_is_off_in_production_unless_asked(
    production_client: AsyncClient,
) -> None:
    assert not GraphQLSettings().introspection_enabled(production=True)
    assert GraphQLSettings().introspection_enabled(production=False)
    assert GraphQLSettings(introspection=True).introspection_enabled(production=True)
    response = await production_client.post(
        "/graphql", json={"query": "{ __schema { types { name } } }"}
    )
    errors = response.json()["errors"]
    assert {error["extensions"]["code"] for error in errors} == {"GRAPHQL_VALIDATION_FAILED"}
    assert "introspection" in errors[0]["message"]


@pytest.fixture
async def production_client(
    settings: Settings, db: Database, redis: Redis
) -> AsyncIterator[AsyncClient]:
    """The app in production mode (the test session's secret kept: it encrypts the signing
    keys other tests stored)."""
    production = settings.model_copy(update={"env": Environment.PRODUCTION})
    application = create_app(production, db=db, redis=redis)
    async with lifespan(application) as manager:
        transport = ASGITransport(app=manager.app)
        async with AsyncClient(transport=transport, base_url="http://sightline.test") as http:
            yield http


async def test_production_names_nothing_the_client_did_not_write(
    production_client: AsyncClient,
) -> None:
    misspelt = await production_client.post("/graphql", json={"query": "{ serverInf { version } }"})
    (error,) = misspelt.json()["errors"]
    assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "Did you mean" not in error["message"]
    bad_enum = await production_client.post(
        "/graphql",
        json={
            "query": "mutation M($c: ID!, $b: OnBusy!) { sendMessage(conversationId: $c, "
            'content: "x", onBusy: $b) { __typename } }',
            "variables": {"c": "x", "b": "REJEC"},
        },
    )
    (error,) = bad_enum.json()["errors"]
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert "REJEC" in error["message"]
    assert "Did you mean" not in error["message"]


async def test_production_serves_no_graphiql(production_client: AsyncClient) -> None:
    page = await production_client.get("/graphql", headers={"accept": "text/html"})
    assert "graphiql" not in page.text.lower()
    assets = await production_client.get("/static/graphiql/LICENSES.md")
    assert assets.status_code == 404


async def test_development_suggests_names(client: AsyncClient) -> None:
    misspelt = await client.post("/graphql", json={"query": "{ serverInf { version } }"})
    assert "Did you mean" in misspelt.json()["errors"][0]["message"]
