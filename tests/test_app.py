"""HTTP probes, metrics, REST error envelope, and startup against services that are down."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from opentelemetry.sdk.trace import TracerProvider
from pydantic import SecretStr
from redis.asyncio import Redis

from backend.config import DatabaseSettings, RedisSettings, Settings
from backend.core.db import DatabaseUnreachable
from backend.core.metrics import Metrics
from backend.core.redis import RedisUnreachable
from backend.core.state import AppState
from tests.conftest import LiveServer, free_port, scaled, serve_live


async def test_healthz(client: AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_when_everything_answers(client: AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "redis": "ok", "migrations": "ok", "models": "ok"},
        "models": {},  # the tests' apps warm nothing up (tests/test_warmup.py does)
    }


async def test_readyz_is_503_when_redis_is_gone(client: AsyncClient, app: FastAPI) -> None:
    state: AppState = app.state.sightline
    # A real client to a port where nothing listens, as after a Redis outage.
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    healthy, state.redis = state.redis, dead
    try:
        response = await client.get("/readyz")
    finally:
        state.redis = healthy
        await dead.aclose()
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["redis"] == "failed"  # why, and where Redis is, goes to the log only


async def test_metrics_count_requests_and_operations(client: AsyncClient) -> None:
    await client.post("/graphql", json={"query": "query Probe { serverInfo { version } }"})
    await client.post("/graphql", json={"query": "{ nope }"})
    body = (await client.get("/metrics")).text
    assert (
        'sightline_graphql_operations_total{operation="Probe",outcome="ok",type="query"} 1.0'
        in body
    )
    assert 'outcome="client_error"' in body
    assert 'sightline_http_requests_total{method="POST",route="/graphql",status="200"}' in body
    assert "sightline_websocket_connections_active" in body
    # the refused document is counted once under its code (both result hooks saw it)
    assert (
        'sightline_errors_total{code="GRAPHQL_VALIDATION_FAILED",model="",'
        'operation="anonymous",surface="graphql"} 1.0' in body
    )


def test_operation_names_are_bounded_labels() -> None:
    metrics = Metrics(max_operation_names=2)
    assert metrics.operation_label(None) == "anonymous"
    assert metrics.operation_label("A") == "A"
    assert metrics.operation_label("B") == "B"
    assert metrics.operation_label("C") == "other"  # over the cap
    assert metrics.operation_label("A") == "A"  # already known
    assert metrics.operation_label("drop table;--") == "other"


def test_error_codes_are_bounded_labels() -> None:
    metrics = Metrics(max_error_codes=100)
    assert metrics.code_label("NOT_FOUND") == "NOT_FOUND"
    assert metrics.code_label("not a code") == "OTHER"
    assert metrics.code_label(None) == "OTHER"
    for n in range(200):
        metrics.code_label(f"CODE_{n}")
    assert metrics.code_label("CODE_199") == "OTHER"  # over the cap
    assert metrics.code_label("NOT_FOUND") == "NOT_FOUND"  # already known


async def test_unknown_route_is_a_json_404(client: AsyncClient) -> None:
    response = await client.get("/no/such/thing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


async def test_wrong_method_is_405(client: AsyncClient) -> None:
    response = await client.delete("/healthz")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_unreachable_database_fails_fast_with_one_line(settings: Settings) -> None:
    bad = settings.model_copy(
        update={
            "database": DatabaseSettings(
                url=SecretStr(f"postgresql://nobody:hunter2@127.0.0.1:{free_port()}/x"),
                connect_timeout_s=1,
            )
        }
    )
    async with asyncio.timeout(scaled(60)):  # fails, never hangs
        with pytest.raises(DatabaseUnreachable) as error:
            await AppState.open(bad, metrics=Metrics(), tracer_provider=TracerProvider())
    message = str(error.value)
    assert "\n" not in message
    assert "cannot reach PostgreSQL at" in message
    assert "hunter2" not in message  # the password never reaches a log line


async def test_unreachable_redis_fails_fast(settings: Settings) -> None:
    bad = settings.model_copy(
        update={"redis": RedisSettings(url=SecretStr(f"redis://127.0.0.1:{free_port()}/0"))}
    )
    with pytest.raises(RedisUnreachable, match=r"cannot reach Redis at 127\.0\.0\.1"):
        await AppState.open(bad, metrics=Metrics(), tracer_provider=TracerProvider())


async def test_a_live_server_that_cannot_start_fails_its_own_test_only(
    settings: Settings, live_server: LiveServer
) -> None:
    """uvicorn exits the process when start-up fails; the harness makes that one test's error
    (a SystemExit escaping a task once broke every test after it, then the session)."""
    bad = settings.model_copy(
        update={"redis": RedisSettings(url=SecretStr(f"redis://127.0.0.1:{free_port()}/0"))}
    )
    with pytest.raises(RuntimeError, match="uvicorn could not start"):
        async with serve_live(bad):
            pass
    async with AsyncClient(base_url=live_server.http_url) as http:  # the loop still serves
        assert (await http.get("/healthz")).status_code == 200
