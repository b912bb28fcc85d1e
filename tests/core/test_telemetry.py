"""Traces (HTTP, GraphQL, DB spans and their parentage) and JSON logs carrying trace ids."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from httpx import AsyncClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from backend.config import DatabaseSettings, LogFormat, TelemetrySettings
from backend.core.db import Database
from backend.core.telemetry import build_tracer_provider, configure_logging

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_graphql_span_is_a_child_of_the_http_span(
    client: AsyncClient, spans: InMemorySpanExporter
) -> None:
    response = await client.post(
        "/graphql",
        json={"query": "query Traced { serverInfo { version } }"},
        headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
    )
    assert response.status_code == 200
    finished = {span.name: span for span in spans.get_finished_spans()}
    http = finished["HTTP POST /graphql"]
    operation = finished["graphql.query Traced"]
    assert format(http.context.trace_id, "032x") == TRACE_ID  # continues the caller's trace
    assert operation.parent is not None
    assert operation.parent.span_id == http.context.span_id
    assert http.attributes["http.response.status_code"] == 200


async def test_probes_are_not_traced(client: AsyncClient, spans: InMemorySpanExporter) -> None:
    await client.get("/healthz")
    assert not spans.get_finished_spans()


async def test_statements_are_client_spans(database_url: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    db = Database.connect(database_url, DatabaseSettings(), provider)
    try:
        with provider.get_tracer("test").start_as_current_span("request") as parent:
            async with db.session() as session:
                await session.execute(text("SELECT 1"))
    finally:
        await db.dispose()
    [statement] = [s for s in exporter.get_finished_spans() if s.name.startswith("db ")]
    assert statement.name == "db SELECT"
    assert statement.attributes is not None
    assert statement.attributes["db.system"] == "postgresql"
    assert statement.attributes["db.statement"] == "SELECT 1"
    assert statement.parent is not None
    assert statement.parent.span_id == parent.get_span_context().span_id
    # the database it went to: once for all statements, on their instrumentation scope
    assert statement.instrumentation_scope is not None
    assert statement.instrumentation_scope.name == "sightline.db"
    assert statement.instrumentation_scope.attributes is not None
    assert statement.instrumentation_scope.attributes["db.name"]


async def test_statements_outside_traced_work_and_the_tenant_scope_get_no_span(
    database_url: str,
) -> None:
    """A statement with no recording span around it (a probe's, a periodic job's) would be a
    trace of one span; the tenant scope opening every unit of work tells a trace nothing."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    db = Database.connect(database_url, DatabaseSettings(), provider)
    try:
        async with db.session() as session:
            await session.execute(text("SELECT 1"))
        assert not exporter.get_finished_spans()
        with provider.get_tracer("test").start_as_current_span("request"):
            async with db.session() as session:
                await session.execute(text("SELECT 2"))
                await session.execute(text("SELECT 3"))
    finally:
        await db.dispose()
    statements = [
        s.attributes["db.statement"]
        for s in exporter.get_finished_spans()
        if s.name.startswith("db ") and s.attributes is not None
    ]
    assert statements == ["SELECT 2", "SELECT 3"]


def test_json_logs_carry_the_trace_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(TelemetrySettings(log_format=LogFormat.JSON))
    try:
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("work") as span:
            logging.getLogger("sightline.test").warning("inside a span")
        record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        configure_logging(TelemetrySettings(log_format=LogFormat.TEXT))
    assert record["message"] == "inside a span"
    assert record["level"] == "WARNING"
    assert record["trace_id"] == format(span.get_span_context().trace_id, "032x")


def test_spans_are_exported_over_otlp_http_when_an_endpoint_is_set() -> None:
    received: list[tuple[str, str, int]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            self.rfile.read(length)
            received.append((self.path, self.headers["Content-Type"], length))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        provider = build_tracer_provider(TelemetrySettings(otlp_endpoint=endpoint))
        with provider.get_tracer("test").start_as_current_span("exported"):
            pass
        assert provider.force_flush(5_000)
        provider.shutdown()
    finally:
        server.shutdown()
    assert received
    path, content_type, length = received[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert length > 0
