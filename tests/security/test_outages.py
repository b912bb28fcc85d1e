"""PostgreSQL or Redis down: every answer is a typed SERVICE_UNAVAILABLE (GraphQL code, HTTP 503
with Retry-After), never a driver message or an internal address; and all is well once the
service is back. Each test runs a server on a Redis and a PostgreSQL of its own, to stop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from backend.config import AuthSettings, DatabaseSettings, RedisSettings, Settings, VisionSettings
from backend.core.embedded import EmbeddedPostgres
from tests.conftest import LiveServer, dies_with_tests, free_port, scaled, serve_live
from tests.graphql.ws import init, open_socket, receive, send, subscribe

ADMIN_EMAIL = "admin@outage.example"
ADMIN_PASSWORD = "outage admin password"
LEAKS = ("127.0.0.1", "Error ", "Connection refused", "FileNotFoundError", "asyncpg", "redis", "/")


class PrivateRedis:
    """A redis-server of the test's own, on a free loopback port, to stop and start."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._process = subprocess.Popen(  # noqa: ASYNC220 (returns at once; waits below)
            dies_with_tests(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        try:
            async with asyncio.timeout(30):
                while True:
                    try:
                        await client.ping()
                        return
                    except Exception:
                        await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            await asyncio.to_thread(self._process.wait, 30)
            self._process = None


@dataclass
class Backends:
    redis: PrivateRedis
    postgres: EmbeddedPostgres
    settings: Settings

    async def stop_postgres(self) -> None:
        await asyncio.to_thread(self.postgres.stop)

    async def start_postgres(self) -> None:
        await asyncio.to_thread(self.postgres.start)


@pytest.fixture
async def backends(settings: Settings, tmp_path: Path) -> AsyncIterator[Backends]:
    redis = PrivateRedis(tmp_path)
    await redis.start()
    postgres = EmbeddedPostgres(tmp_path / "pg" / "data")
    database_url = await asyncio.to_thread(postgres.start)
    own = settings.model_copy(
        update={
            "database": DatabaseSettings(
                url=SecretStr(database_url), migrate_on_start=True, connect_timeout_s=2
            ),
            "redis": RedisSettings(url=SecretStr(redis.url), key_prefix="outage:"),
            "auth": AuthSettings(
                bootstrap_admin_email=ADMIN_EMAIL,
                bootstrap_admin_password=SecretStr(ADMIN_PASSWORD),
            ),
        }
    )
    own.guardrails.enabled = False
    try:
        yield Backends(redis, postgres, own)
    finally:
        await redis.stop()
        await asyncio.to_thread(postgres.stop)


@asynccontextmanager
async def serving(backends: Backends) -> AsyncIterator[tuple[LiveServer, httpx.AsyncClient]]:
    async with (
        serve_live(backends.settings) as server,
        httpx.AsyncClient(base_url=server.http_url, timeout=30) as http,
    ):
        yield server, http


async def password_grant(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post(
        "/oauth/token",
        data={
            "grant_type": "password",
            "tenant": "default",
            "username": ADMIN_EMAIL,
            "password": ADMIN_PASSWORD,
        },
    )


async def sign_in(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await password_grant(http)
    assert response.status_code == 200, response.text
    return response.json()


async def graphql(
    http: httpx.AsyncClient, query: str, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = await http.post("/graphql", json={"query": query}, headers=headers)
    return response.status_code, response.json()


def unavailable(body: dict[str, Any]) -> None:
    """Every error says SERVICE_UNAVAILABLE and nothing about the backing service."""
    assert body.get("errors"), body
    for error in body["errors"]:
        assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE", body
    text = str(body)
    assert not any(leak in text for leak in LEAKS), body


def unavailable_http(response: httpx.Response) -> None:
    """A REST answer to an outage: 503 with Retry-After, naming nothing internal."""
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert not any(leak in response.text for leak in LEAKS), response.text


async def test_redis_down_answers_service_unavailable_then_recovers(backends: Backends) -> None:
    async with serving(backends) as (server, http):
        tokens = await sign_in(http)
        access = tokens["access_token"]
        await backends.redis.stop()

        for query, credential in (
            ("{ me { userId } }", None),  # anonymous: the address leaked here before
            ("{ me { userId } }", access),
            ("{ serverInfo { version } }", None),
            ('mutation { createConversation(title: "x") { id } }', access),
        ):
            _, body = await graphql(http, query, credential)
            unavailable(body)
            assert body["errors"][0]["extensions"]["retryAfter"] >= 1

        token_response = await password_grant(http)
        unavailable_http(token_response)
        assert token_response.json()["error"] == "temporarily_unavailable"
        unavailable_http(await http.post("/oauth/revoke", data={"token": tokens["refresh_token"]}))

        # A socket still opens (the credential cannot be checked yet); what needs it says so.
        async with await open_socket(server.ws_url) as ws:
            await init(ws, {"authorization": f"Bearer {access}"})
            await subscribe(ws, "subscription { heartbeat(intervalMs: 100, count: 1) { seq } }")
            message = await receive(ws)
            errors = (
                message["payload"] if message["type"] == "error" else message["payload"]["errors"]
            )
            unavailable({"errors": errors})

        await backends.redis.start()
        _, body = await graphql(http, "{ me { userId } }", access)
        assert body["data"]["me"]["userId"]
        assert (await password_grant(http)).status_code == 200
        # The logout that failed during the outage succeeds when retried, and holds.
        assert (
            await http.post("/oauth/revoke", data={"token": tokens["refresh_token"]})
        ).is_success
        _, body = await graphql(http, "{ me { userId } }", access)
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_postgres_down_answers_service_unavailable_then_recovers(
    backends: Backends,
) -> None:
    async with serving(backends) as (_, http):
        tokens = await sign_in(http)
        access = tokens["access_token"]
        _, created = await graphql(http, 'mutation { createApiKey(name: "k") { secret } }', access)
        key = created["data"]["createApiKey"]["secret"]  # not used yet: not cached
        await backends.stop_postgres()

        # Access tokens need no database: what needs none keeps working.
        _, body = await graphql(http, "{ me { userId } }", access)
        assert body["data"]["me"]["userId"]
        for query, credential in (
            ("{ users { id } }", access),
            ('mutation { createConversation(title: "x") { id } }', access),
            ("{ me { userId } }", key),  # an API key is checked in the database
        ):
            _, body = await graphql(http, query, credential)
            unavailable(body)
        for response in (
            await password_grant(http),
            await http.post(
                "/oauth/token",
                data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            ),
        ):
            unavailable_http(response)
            assert response.json()["error"] == "temporarily_unavailable"

        await backends.start_postgres()
        _, body = await graphql(http, "{ users { id } }", access)
        assert body["data"]["users"]
        _, body = await graphql(http, "{ me { credential } }", key)
        assert body["data"]["me"]["credential"] == "api_key"
        assert (await password_grant(http)).status_code == 200


async def live_camera_hello(server: LiveServer, credential: str) -> tuple[list[dict], int | None]:
    """What the live camera socket answers to its auth message: the messages, and the close
    code (None while it stays open)."""
    url = server.ws_url.replace("/graphql", "/ws/vision/live?tasks=detect")
    messages: list[dict[str, Any]] = []
    async with connect(url, open_timeout=scaled(30)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": credential}))
        try:
            while True:
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), scaled(30))))
                if messages[-1]["type"] == "ready":
                    return messages, None
        except ConnectionClosed:
            return messages, ws.close_code


def live_unavailable(messages: list[dict[str, Any]], code: int | None) -> None:
    """An outage is a typed error, then a "try again later" close (1013, not 4403: the
    credential may be fine, as the GraphQL socket does not reject it either)."""
    assert [m["type"] for m in messages] == ["error"], messages
    assert messages[0]["code"] == "SERVICE_UNAVAILABLE"
    assert messages[0]["retryAfter"] >= 1
    assert not any(leak in str(messages) for leak in LEAKS), messages
    assert code == 1013


async def test_the_live_camera_socket_answers_an_outage_with_a_typed_error(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    backends.settings.vision = VisionSettings(enabled=True, workers=1)
    async with serving(backends) as (server, http):
        access = (await sign_in(http))["access_token"]
        _, created = await graphql(http, 'mutation { createApiKey(name: "k") { secret } }', access)
        key = created["data"]["createApiKey"]["secret"]  # not used yet: not cached

        await backends.redis.stop()
        live_unavailable(*await live_camera_hello(server, access))
        await backends.redis.start()

        await backends.stop_postgres()
        live_unavailable(*await live_camera_hello(server, key))  # checked in the database
        await backends.start_postgres()

        for credential in (access, key):
            messages, code = await live_camera_hello(server, credential)
            assert code is None, (messages, code)
    assert "Exception in ASGI application" not in caplog.text


HEARTBEAT = "subscription { heartbeat(intervalMs: 100, count: 1) { seq } }"


def persisted(query: str) -> dict[str, Any]:
    digest = hashlib.sha256(query.encode()).hexdigest()
    return {"persistedQuery": {"version": 1, "sha256Hash": digest}}


def streamed_errors(response: httpx.Response) -> list[dict[str, Any]]:
    """The errors in an SSE or multipart subscription answer."""
    bodies = []
    if response.headers["content-type"].startswith("text/event-stream"):
        bodies = [
            json.loads(line[len("data:") :])
            for line in response.text.splitlines()
            if line.startswith("data:") and line[len("data:") :].strip()
        ]
    else:
        parts = [p for p in response.text.split("--graphql") if "{" in p]
        bodies = [json.loads(p[p.index("{") :]) for p in parts]
        bodies = [b.get("payload") or b for b in bodies]
    return [e for b in bodies for e in b.get("errors") or ()]


async def test_persisted_queries_with_redis_down_are_service_unavailable(
    backends: Backends, caplog: pytest.LogCaptureFixture
) -> None:
    """The persisted-query lookup happens before the operation runs: with Redis down each
    transport answers a typed SERVICE_UNAVAILABLE, and a subscription is answered and ended,
    not broken off without a word."""
    async with serving(backends) as (server, http):
        access = (await sign_in(http))["access_token"]
        headers = {"authorization": f"Bearer {access}"}
        await backends.redis.stop()

        query = "{ serverInfo { version } }"
        for body in (
            {"extensions": persisted(query)},  # a lookup
            {"query": query, "extensions": persisted(query)},  # a store
        ):
            response = await http.post("/graphql", json=body, headers=headers)
            assert response.status_code < 500, response.text
            unavailable(response.json())

        for accept in ("text/event-stream", 'multipart/mixed;subscriptionSpec="1.0"'):
            response = await http.post(
                "/graphql",
                json={"extensions": persisted(HEARTBEAT)},
                headers={**headers, "accept": accept},
            )
            assert response.status_code < 500, response.text
            unavailable({"errors": streamed_errors(response)})

        # The WebSocket protocols require the query's text (the extension is not applied
        # there): what Apollo's WebSocket link sends, the text with its hash, is refused typed
        # and the socket goes on.
        async with await open_socket(server.ws_url) as ws:
            await init(ws, {"authorization": f"Bearer {access}"})
            payload = {"query": HEARTBEAT, "extensions": persisted(HEARTBEAT)}
            await send(ws, {"id": "1", "type": "subscribe", "payload": payload})
            message = await receive(ws)
            assert (message["type"], message["id"]) == ("error", "1"), message
            unavailable({"errors": message["payload"]})
            await send(ws, {"type": "ping"})
            assert (await receive_any(ws))["type"] == "pong"

        await backends.redis.start()
        for accept in ("text/event-stream", 'multipart/mixed;subscriptionSpec="1.0"'):
            response = await http.post(  # a hash never seen: the client is told to send it
                "/graphql",
                json={"extensions": persisted(HEARTBEAT)},
                headers={**headers, "accept": accept},
            )
            [error] = streamed_errors(response)
            assert error["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND", response.text
        registered = await http.post(
            "/graphql", json={"query": query, "extensions": persisted(query)}, headers=headers
        )
        assert registered.json()["data"]["serverInfo"]["version"]
        hit = await http.post("/graphql", json={"extensions": persisted(query)}, headers=headers)
        assert hit.json()["data"] == registered.json()["data"]
    assert "Exception in ASGI application" not in caplog.text


async def receive_any(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), scaled(30)))
