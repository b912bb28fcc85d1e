"""Logs and traces never carry what users say or what proves who they are: a workload (sign in,
refresh, chat with the stub LLM, ingest a document, create and use an API key, a wrong
password, sign out) runs with DEBUG logs captured and every span kept, then both are searched
for message and document text, tokens, keys, passwords and the server's secrets."""

from __future__ import annotations

import logging
import secrets
import traceback
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import ChatSettings, Settings, TelemetrySettings
from backend.knowledge.embeddings import LocalEmbedder
from tests.agents.test_agent import events_of, text
from tests.agents.test_runs import PASSWORD, gql, start_run
from tests.conftest import LiveServer, serve_live
from tests.knowledge.test_graphql import job_events
from tests.llm_stub import LLMStub

CARD = "4111 1111 1111 1111"


def _record_text(record: logging.LogRecord) -> str:
    parts = [str(record.msg), repr(record.args)]
    try:
        parts.append(record.getMessage())
    except Exception:  # a record whose args do not fit its format is still searched raw
        parts.append("")
    if record.exc_info and record.exc_info[1] is not None:
        parts.append("".join(traceback.format_exception(*record.exc_info)))
    if record.exc_text:
        parts.append(record.exc_text)
    standard = set(vars(logging.makeLogRecord({})))
    parts += [f"{k}={v!r}" for k, v in vars(record).items() if k not in standard]
    return "\n".join(parts)


def _span_text(span: Any) -> str:
    parts = [span.name, repr(dict(span.attributes or {}))]
    if span.status.description:
        parts.append(span.status.description)
    for event in span.events:
        parts += [event.name, repr(dict(event.attributes or {}))]
    return "\n".join(parts)


async def _token(http: httpx.AsyncClient, **form: str) -> dict[str, Any]:
    response = await http.post("/oauth/token", data=form)
    return {"status": response.status_code, **response.json()}


async def _workload(server: LiveServer, account: dict[str, Any], marks: dict[str, str]) -> None:
    """Everything a user does that carries secrets or words; records what was issued."""
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        signed = await _token(
            http,
            grant_type="password",
            tenant=account["tenant"],
            username="u@chat.example",
            password=PASSWORD,
        )
        assert signed["status"] == 200, signed
        marks["first refresh token"] = signed["refresh_token"]
        marks["first access token"] = signed["access_token"]
        refreshed = await _token(
            http, grant_type="refresh_token", refresh_token=signed["refresh_token"]
        )
        assert refreshed["status"] == 200, refreshed
        token = marks["access token"] = refreshed["access_token"]
        marks["refresh token"] = refreshed["refresh_token"]
        wrong = await _token(
            http,
            grant_type="password",
            tenant=account["tenant"],
            username="u@chat.example",
            password=marks["wrong password"],
        )
        assert wrong["status"] == 400

    _, run_id = await start_run(server, token, marks["message"])
    events = await events_of(server, token, run_id)
    assert marks["message"].split()[0] in text(events)  # the stub echoed it: it was streamed

    ingested = await gql(
        server,
        token,
        'mutation($t: String!) { ingestDocument(text: $t, source: "notes") { id } }',
        t=marks["document"],
    )
    assert "errors" not in ingested, ingested
    done = await job_events(server, token, ingested["data"]["ingestDocument"]["id"])
    assert done[-1]["__typename"] == "IngestionCompleted", done

    created = await gql(
        server, token, 'mutation { createApiKey(name: "ci") { secret apiKey { prefix } } }'
    )
    secret = marks["API key"] = created["data"]["createApiKey"]["secret"]
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        me = await http.post(
            "/graphql", json={"query": "{ me { userId } }"}, headers={"x-api-key": secret}
        )
        assert "errors" not in me.json(), me.json()
        bad = await http.post(
            "/graphql",
            json={"query": "{ me { userId } }"},
            headers={"authorization": f"Bearer {secret}x"},
        )
        assert bad.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        out = await http.post("/oauth/revoke", data={"token": marks["refresh token"]})
        assert out.status_code == 200


@pytest.fixture
def leak_settings(chat_settings: Settings) -> Settings:
    chat_settings.telemetry = TelemetrySettings(log_level="DEBUG", log_format="text")
    # (the secret key stays: signing keys other tests stored in the database are sealed with it)
    chat_settings.chat = ChatSettings(
        llm_base_url=chat_settings.chat.llm_base_url,
        llm_model="echo",
        llm_api_key=SecretStr("sk-" + secrets.token_hex(16)),
        run_lease_s=1,
    )
    return chat_settings


async def test_logs_and_traces_carry_no_words_tokens_or_secrets(
    leak_settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
    llm: tuple[LLMStub, str],
    embedder: LocalEmbedder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tag = secrets.token_hex(6)
    marks = {
        "message": f"zebra{tag}message my card is {CARD} and my mail is ada{tag}@example.com",
        "document": f"Quartz{tag} handbook. Refunds take fourteen days from the warehouse.",
        "wrong password": f"wrong-{tag}-password",
        "password": PASSWORD,
        "secret key": leak_settings.security.secret_key.get_secret_value(),
        "LLM API key": leak_settings.chat.llm_api_key.get_secret_value(),  # type: ignore[union-attr]
    }
    spans = InMemorySpanExporter()
    caplog.set_level(logging.DEBUG)
    async with serve_live(
        leak_settings, embedder=embedder, span_processors=[SimpleSpanProcessor(spans)]
    ) as server:
        await _workload(server, account, marks)
    assert llm[0].requests  # the model was called (with the key, over HTTP)

    searched = {
        "message words": f"zebra{tag}message",
        "card number": CARD,
        "e-mail in a message": f"ada{tag}@example.com",
        "document words": f"Quartz{tag}",
        **{name: value for name, value in marks.items() if name not in {"message", "document"}},
    }
    # (the test's own WebSocket client logs its frames: not the server's records)
    records = [(r.name, _record_text(r)) for r in caplog.records if r.name != "websockets.client"]
    traced = [(s.name, _span_text(s)) for s in spans.get_finished_spans()]
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # DEBUG logging was on
    assert len(traced) > 50
    leaks = [
        f"{what} in {kind} {name}: {body[:300]!r}"
        for kind, found in (("log record", records), ("span", traced))
        for name, body in found
        for what, value in searched.items()
        if value in body
    ]
    assert not leaks, "\n".join(leaks[:20])


async def test_a_failed_statement_shows_no_values_in_errors_or_spans(
    database_url: str, engine: AsyncEngine
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from sqlalchemy import text as sql
    from sqlalchemy.exc import DBAPIError

    from backend.config import DatabaseSettings
    from backend.core.db import Database

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    db = Database.connect(database_url, DatabaseSettings(), provider)
    value = f"secret-{secrets.token_hex(6)}"
    try:
        # statements are traced as steps of traced work (a request, a turn, a job)
        with (
            provider.get_tracer("test").start_as_current_span("request"),
            pytest.raises(DBAPIError) as failed,
        ):
            async with db.session() as session:
                await session.execute(sql("SELECT CAST(:v AS integer)"), {"v": value})
    finally:
        await db.dispose()
    # SQLAlchemy does not list the values (the driver may still quote the one it choked on,
    # so the message goes on no trace: only its type and SQLSTATE do)
    assert "[SQL parameters hidden" in str(failed.value)
    (span,) = [
        s for s in exporter.get_finished_spans() if "CAST" in s.attributes.get("db.statement", "")
    ]
    assert value not in _span_text(span)
    assert span.status.description == type(failed.value.orig).__name__
    assert span.events[0].attributes["exception.type"]
