"""GraphQL over HTTP: queries, GraphiQL, limits and the shape of every kind of error."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import strawberry
from httpx import AsyncClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from backend import __version__
from backend.config import GraphQLSettings, Settings
from backend.core.metrics import Metrics
from backend.errors import NotFound
from backend.graphql.context import Context
from backend.graphql.evolution import API_VERSION, CHANGELOG_FILE, read_changelog
from backend.graphql.extensions import MASKED_MESSAGE, OperationObservability
from backend.graphql.schema import SightlineSchema, build_schema
from tests.conftest import LiveServer


async def gql(client: AsyncClient, query: str, **body: Any) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, **body})
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


async def test_server_info(client: AsyncClient) -> None:
    result = await gql(
        client,
        "query Info { serverInfo { version apiVersion environment uptimeSeconds serverTime "
        "dashboardsUrl features { name enabled } models { name task installed } } }",
    )
    info = result["data"]["serverInfo"]
    assert info["version"] == __version__
    # the newest release in the changelog, whose schema CI keeps working
    assert info["apiVersion"] == API_VERSION
    assert read_changelog(CHANGELOG_FILE.read_text(encoding="utf-8")).latest == API_VERSION
    assert info["dashboardsUrl"] is None  # not configured
    assert info["environment"] == "test"
    features = {f["name"]: f["enabled"] for f in info["features"]}
    assert features["subscriptions.graphql-transport-ws"] is True
    assert features["database.embedded"] is False  # the tests hand the database in
    assert {m["task"] for m in info["models"]} >= {"chat", "embedding", "classification"}


async def test_query_over_get(client: AsyncClient) -> None:
    response = await client.get("/graphql", params={"query": "{ serverInfo { version } }"})
    assert response.status_code == 200
    assert response.json()["data"]["serverInfo"]["version"] == __version__


async def test_graphiql_is_served_to_browsers_without_a_cdn(client: AsyncClient) -> None:
    response = await client.get("/graphql", headers={"accept": "text/html"})
    assert response.status_code == 200
    assert "unpkg.com" not in response.text
    assets = re.findall(r'(?:src|href)="(/static/graphiql/[^"]+)"', response.text)
    assert len(assets) == 7
    for asset in assets:
        served = await client.get(asset)
        assert served.status_code == 200, asset
        assert len(served.content) > 500


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("{ serverInfo { ", "GRAPHQL_PARSE_FAILED"),
        ("{ serverInfo { noSuchField } }", "GRAPHQL_VALIDATION_FAILED"),
        ("{ noSuchRoot }", "GRAPHQL_VALIDATION_FAILED"),
        ("mutation { serverInfo { version } }", None),
    ],
)
async def test_bad_documents_get_coded_errors(
    client: AsyncClient, query: str, code: str | None
) -> None:
    response = await client.post("/graphql", json={"query": query})
    assert response.status_code in {200, 400}
    errors = response.json()["errors"]
    assert errors
    if code:
        assert errors[0]["extensions"]["code"] == code


async def test_unknown_operation_name_is_rejected(client: AsyncClient) -> None:
    response = await client.post(
        "/graphql", json={"query": "query A { serverInfo { version } }", "operationName": "B"}
    )
    assert response.status_code == 400
    assert response.json()["errors"]


async def test_bad_variables_are_bad_user_input(client: AsyncClient) -> None:
    result = await gql(
        client,
        "query Q($n: Int) { serverInfo { version } }",
        variables={"n": "not a number"},
    )
    assert result["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


@pytest.mark.parametrize("body", [b"not json", b"[1, 2", b'{"query": 5}', b""])
async def test_invalid_request_bodies_are_400(client: AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/graphql", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


async def test_depth_limit_is_a_setting(app: Any) -> None:
    schema = build_schema(GraphQLSettings(max_depth=1))
    context = Context(state=app.state.sightline, services=app.state.services)
    shallow = await schema.execute("{ serverInfo { version } }", context_value=context)
    assert not shallow.errors
    deep = await schema.execute("{ serverInfo { features { name } } }", context_value=context)
    assert deep.errors
    assert "exceeds maximum operation depth" in deep.errors[0].message
    assert deep.errors[0].extensions["code"] == "GRAPHQL_VALIDATION_FAILED"


async def test_alias_and_token_limits(client: AsyncClient) -> None:
    aliases = " ".join(f"a{i}: serverInfo {{ version }}" for i in range(40))
    result = await gql(client, "{ " + aliases + " }")
    assert result["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    tokens = " ".join("version" for _ in range(5000))
    response = await client.post("/graphql", json={"query": "{ serverInfo { " + tokens + " } }"})
    assert response.json()["errors"]


async def test_oversized_body_is_413_and_server_keeps_serving(
    client: AsyncClient, settings: Any
) -> None:
    big = "x" * (settings.server.max_body_bytes + 10)
    response = await client.post("/graphql", json={"query": big})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

    async def chunks() -> Any:  # no Content-Length: the limit counts streamed bytes
        for _ in range(settings.server.max_body_bytes // 65536 + 2):
            yield b"x" * 65536

    response = await client.post(
        "/graphql", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert (await gql(client, "{ serverInfo { version } }"))["data"]


# A schema with resolvers that fail, run through the same extension as the real schema.
@strawberry.type
class _FailingQuery:
    @strawberry.field
    def expected(self) -> str | None:
        raise NotFound("no such thing", id="42")

    @strawberry.field
    def bug(self) -> str | None:
        raise RuntimeError("secret connection string postgres://u:p@db")

    @strawberry.field
    def fine(self) -> str:
        return "ok"


class _State:
    """The parts of AppState the extension and serverInfo read."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.embedded_database = self.embedded_redis = False
        self.uptime_s = 0.0
        self.metrics = Metrics()
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))


class _Context:
    def __init__(self) -> None:
        self.state = _State()


async def test_expected_errors_keep_their_code_and_bugs_are_masked() -> None:
    schema = SightlineSchema(query=_FailingQuery, extensions=[OperationObservability])
    context = _Context()
    result = await schema.execute("query Mixed { expected bug fine }", context_value=context)
    assert result.data == {"expected": None, "bug": None, "fine": "ok"}
    by_path = {e.path[0]: e for e in result.errors or []}
    assert by_path["expected"].message == "no such thing"
    assert by_path["expected"].extensions == {"code": "NOT_FOUND", "id": "42"}
    assert by_path["bug"].message == MASKED_MESSAGE
    assert by_path["bug"].extensions == {"code": "INTERNAL_SERVER_ERROR"}
    assert "postgres://" not in str(result.errors)

    (span,) = context.state.exporter.get_finished_spans()
    assert span.name == "graphql.query Mixed"
    assert any(e.name == "exception" for e in span.events)  # the bug is on the trace
    samples = context.state.metrics.graphql_operations.labels("Mixed", "query", "server_error")
    assert samples._value.get() == 1


SUBSCRIBE = "subscription { heartbeat(intervalMs: 100, count: 2) { seq } }"


async def test_subscription_over_plain_http_is_refused(client: AsyncClient) -> None:
    response = await client.post("/graphql", json={"query": SUBSCRIBE})
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "BAD_REQUEST"
    assert "subscription" in error["message"].lower()


async def test_subscription_over_http_multipart(live_server: LiveServer) -> None:
    accept = 'multipart/mixed;subscriptionSpec="1.0",application/json'
    async with AsyncClient() as http:
        response = await http.post(
            f"{live_server.http_url}/graphql",
            json={"query": SUBSCRIBE},
            headers={"accept": accept},
            timeout=10,
        )
    assert response.headers["content-type"].startswith("multipart/mixed")
    payloads = [
        json.loads(part[part.index("{") :])
        for part in response.text.split("--graphql")
        if "{" in part
    ]
    seqs = [p["payload"]["data"]["heartbeat"]["seq"] for p in payloads if p.get("payload")]
    assert seqs == [0, 1]


async def test_subscription_over_http_sse(live_server: LiveServer) -> None:
    async with AsyncClient() as http:
        response = await http.post(
            f"{live_server.http_url}/graphql",
            json={"query": SUBSCRIBE},
            headers={"accept": "text/event-stream"},
            timeout=10,
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data:") :])
        for line in response.text.splitlines()
        if line.startswith("data:") and line[len("data:") :].strip()
    ]
    seqs = [e["data"]["heartbeat"]["seq"] for e in events if "data" in e]
    assert seqs == [0, 1]


def test_an_unreachable_backing_service_is_service_unavailable_not_a_bug() -> None:
    from graphql import GraphQLError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from backend.graphql.extensions import is_unexpected, shape_error

    for exc in (RedisConnectionError("No connection available."), PoolTimeout("pool")):
        error = GraphQLError("x", path=["field"], original_error=exc)
        assert not is_unexpected(error)
        shaped = shape_error(error)
        assert shaped.extensions == {"code": "SERVICE_UNAVAILABLE", "retryAfter": 1}
        assert "retry" in shaped.message


async def test_a_query_from_a_client_that_prefers_json_gets_json(live_server: LiveServer) -> None:
    """urql's default Accept lists the stream types after JSON: a query is answered as JSON."""
    urql = (
        "application/graphql-response+json, application/graphql+json, application/json, "
        "text/event-stream, multipart/mixed"
    )
    async with AsyncClient() as http:
        query = await http.post(
            f"{live_server.http_url}/graphql",
            json={"query": "{ serverInfo { version } }"},
            headers={"accept": urql},
            timeout=10,
        )
        streamed = await http.post(
            f"{live_server.http_url}/graphql",
            json={"query": SUBSCRIBE},
            headers={"accept": "text/event-stream, application/json"},
            timeout=10,
        )
    assert query.headers["content-type"].startswith("application/")
    assert query.json()["data"]["serverInfo"]["version"]
    assert streamed.headers["content-type"].startswith("text/event-stream")
