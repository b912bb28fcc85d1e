"""A bounded GraphQL fuzz: documents generated from our own schema (valid ones with arbitrary
arguments, NUL characters included, and invalid ones), sent anonymously and as a tenant owner.
Whatever comes back, it is a typed answer: never a 5xx, never INTERNAL_SERVER_ERROR, never an
error without a code."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import graphql
import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from hypothesis_graphql import Mode, from_schema
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.app import create_app, schema_sdl
from backend.config import LimitsSettings, Settings
from tests.accounts import Account
from tests.conftest import lifespan

SDL = schema_sdl()


def _string(value: str) -> graphql.StringValueNode:
    return graphql.StringValueNode(value=value)


SCALARS = {
    "Date": st.dates().map(lambda d: _string(d.isoformat())),
    "DateTime": st.datetimes(timezones=st.just(UTC)).map(lambda d: _string(d.isoformat())),
    "JSON": st.one_of(
        st.text(max_size=20).map(_string),
        st.integers(-(10**6), 10**6).map(lambda i: graphql.IntValueNode(value=str(i))),
        st.just(graphql.ObjectValueNode(fields=())),
    ),
    "Upload": st.just(graphql.NullValueNode()),
}

_SCHEMA = graphql.build_schema(SDL)
ROOT_FIELDS = sorted(
    {*_SCHEMA.query_type.fields, *_SCHEMA.mutation_type.fields}  # type: ignore[union-attr]
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.limits = LimitsSettings(enabled=False)  # rate limits would answer most of it
    return settings


@pytest.fixture
async def app(settings: Settings, redis: Redis, engine: AsyncEngine) -> AsyncIterator[FastAPI]:
    """The app on its own connection pool, as in production: one request may run sessions
    concurrently (hybrid search ranks both ways at once), which the rolled-back test
    connection cannot (its savepoints interleave). What the fuzz writes is committed."""
    application = create_app(settings, redis=redis)
    async with lifespan(application) as manager:
        application.state.asgi = manager.app
        application.state.sightline = manager._state["sightline"]
        application.state.services = manager._state["services"]
        yield application


def _problems(status: int, body: Any) -> list[str]:
    if status >= 500:
        return [f"HTTP {status}: {body}"]
    results = body if isinstance(body, list) else [body]
    problems = []
    for result in results:
        errors = result.get("errors") or ([result["error"]] if "error" in result else [])
        for error in errors:
            code = (error.get("extensions") or {}).get("code") or error.get("code")
            if code is None or code == "INTERNAL_SERVER_ERROR":
                problems.append(f"{code}: {error}")
    return problems


async def _send(client: AsyncClient, document: str, headers: dict[str, str]) -> list[str]:
    response = await client.post("/graphql", json={"query": document}, headers=headers)
    try:
        body = response.json()
    except ValueError:
        return [f"HTTP {response.status_code}, not JSON: {response.text[:200]}"]
    return _problems(response.status_code, body)


FUZZ = examples(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
# What a client's strings may hold that PostgreSQL's text does not take: NUL, a lone surrogate.
HOSTILE = ("\\u0000", "\\ud800", "x\\u0000y")


def _hostile(document: str, injected: str) -> str:
    """The document with `injected` (a GraphQL escape) at the start of every string literal."""
    return _STRING.sub(lambda m: f'"{injected}{m.group(1)}"', document)


def _documents(field: str) -> st.SearchStrategy[str]:
    plain = from_schema(SDL, fields=[field], custom_scalars=SCALARS, mode=Mode.POSITIVE)
    return st.one_of(
        plain,
        st.tuples(plain, st.sampled_from(HOSTILE)).map(lambda pair: _hostile(*pair)),
    )


_BY_FIELD = {field: _documents(field) for field in ROOT_FIELDS}


@pytest.mark.parametrize("field", ROOT_FIELDS)
@FUZZ
@given(data=st.data(), signed_in=st.booleans())
async def test_every_root_field_answers_typed(
    client: AsyncClient, owner: Account, field: str, data: st.DataObject, signed_in: bool
) -> None:
    """Valid documents with arbitrary arguments (NUL characters included), field by field;
    operations that start work on services the test app does not run, or that end the owner's
    session, are generated too: they must answer typed."""
    document = data.draw(_BY_FIELD[field], label="document")
    problems = await _send(client, document, owner.headers if signed_in else {})
    assert not problems, f"{document}\n{problems}"


@FUZZ
@given(document=from_schema(SDL, custom_scalars=SCALARS, mode=Mode.NEGATIVE))
async def test_invalid_documents_answer_typed(client: AsyncClient, document: str) -> None:
    problems = await _send(client, document, {})
    assert not problems, f"{document}\n{problems}"
