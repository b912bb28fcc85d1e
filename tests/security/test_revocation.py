"""Revocation ends sessions at once: requests with a revoked credential are refused on the next
call, and open subscriptions end with UNAUTHENTICATED on every replica."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from redis.asyncio import Redis
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from backend.app import build_signer
from backend.auth.service import AuthService
from backend.config import Settings, VisionSettings
from backend.core.db import Database
from backend.core.models import User, UserRole
from backend.core.redis import KeySpace
from backend.services import Services
from tests.accounts import PASSWORD, Account, sign_in, token
from tests.conftest import LiveServer, serve_live
from tests.graphql.ws import init, open_socket, receive, subscribe

ME = "{ me { userId role } }"
CREATE_KEY = 'mutation { createApiKey(name: "k") { secret apiKey { id } } }'
HEARTBEAT = "subscription { heartbeat(intervalMs: 100) { seq } }"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Off: loading the rails' classifier takes seconds of CPU (a start under load times out).
    settings.guardrails.enabled = False
    return settings


async def gql(
    client: AsyncClient, query: str, headers: dict[str, str], **variables: Any
) -> dict[str, Any]:
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables}, headers=headers
    )
    return response.json()


def code(body: dict[str, Any]) -> str | None:
    errors = body.get("errors")
    return errors[0]["extensions"]["code"] if errors else None


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


# -- requests ----------------------------------------------------------------------------------


async def test_logout_ends_that_session_s_access_token_only(
    client: AsyncClient, owner: Account
) -> None:
    other = await sign_in(client, owner.tenant, owner.email)  # a second device
    assert code(await gql(client, ME, owner.headers)) is None
    assert (await client.post("/oauth/revoke", data={"token": owner.refresh_token})).is_success
    refused = await gql(client, ME, owner.headers)
    assert code(refused) == "UNAUTHENTICATED"
    assert "revoked" in refused["errors"][0]["message"]
    assert code(await gql(client, ME, other.headers)) is None  # the other session lives


async def test_the_logout_mutation_ends_the_access_token_too(
    client: AsyncClient, member: Account
) -> None:
    body = await gql(
        client, "mutation($r: String!) { logout(refreshToken: $r) }", {}, r=member.refresh_token
    )
    assert body["data"]["logout"] is True
    assert code(await gql(client, ME, member.headers)) == "UNAUTHENTICATED"


async def test_refresh_token_reuse_ends_every_access_token_of_the_family(
    client: AsyncClient, member: Account
) -> None:
    rotated = await token(client, grant_type="refresh_token", refresh_token=member.refresh_token)
    assert rotated["status"] == 200
    assert code(await gql(client, ME, bearer(rotated["access_token"]))) is None
    replayed = await token(client, grant_type="refresh_token", refresh_token=member.refresh_token)
    assert replayed["error"] == "invalid_grant"
    for access in (member.access_token, rotated["access_token"]):
        assert code(await gql(client, ME, bearer(access))) == "UNAUTHENTICATED"


async def test_a_disabled_user_is_refused_everywhere_at_once(
    client: AsyncClient, owner: Account, member: Account
) -> None:
    key = (await gql(client, CREATE_KEY, member.headers))["data"]["createApiKey"]["secret"]
    assert code(await gql(client, ME, bearer(key))) is None  # verified, now cached in Redis

    disabled = await gql(
        client,
        "mutation($id: ID!) { setUserActive(userId: $id, active: false) { isActive } }",
        owner.headers,
        id=str(member.user_id),
    )
    assert disabled["data"]["setUserActive"] == {"isActive": False}

    for credential in (member.headers, bearer(key)):
        assert code(await gql(client, ME, credential)) == "UNAUTHENTICATED"
        create = await gql(client, 'mutation { createConversation(title: "t") { id } }', credential)
        assert code(create) == "UNAUTHENTICATED"
        assert code(await gql(client, CREATE_KEY, credential)) == "UNAUTHENTICATED"
    refreshed = await token(client, grant_type="refresh_token", refresh_token=member.refresh_token)
    assert refreshed["error"] == "invalid_grant"
    login = await token(
        client,
        grant_type="password",
        tenant=member.tenant.slug,
        username=member.email,
        password=PASSWORD,
    )
    assert login["error"] == "invalid_grant"

    audit = await gql(
        client, '{ auditEvents(event: "user.disabled") { actorId details } }', owner.headers
    )
    assert audit["data"]["auditEvents"] == [
        {"actorId": str(owner.user_id), "details": {"user": str(member.user_id)}}
    ]

    # Enabled again: a new sign-in works; what was revoked stays revoked.
    await gql(
        client,
        "mutation($id: ID!) { setUserActive(userId: $id, active: true) { isActive } }",
        owner.headers,
        id=str(member.user_id),
    )
    again = await sign_in(client, member.tenant, member.email)
    assert code(await gql(client, ME, again.headers)) is None
    assert code(await gql(client, ME, member.headers)) == "UNAUTHENTICATED"
    assert code(await gql(client, ME, bearer(key))) is None  # the key itself was not revoked


async def test_who_may_disable_whom(
    client: AsyncClient, services: Services, owner: Account, member: Account
) -> None:
    mutation = "mutation($id: ID!) { setUserActive(userId: $id, active: false) { id } }"
    assert code(await gql(client, mutation, owner.headers, id=str(owner.user_id))) == "CONFLICT"
    assert code(await gql(client, mutation, member.headers, id=str(owner.user_id))) == "FORBIDDEN"
    admin_email = f"admin@{owner.tenant.slug}.example"
    await services.auth.create_user(
        tenant_id=owner.tenant.id, email=admin_email, password=PASSWORD, role=UserRole.ADMIN
    )
    admin = await sign_in(client, owner.tenant, admin_email)
    assert code(await gql(client, mutation, admin.headers, id=str(owner.user_id))) == "FORBIDDEN"
    assert code(await gql(client, mutation, admin.headers, id=str(member.user_id))) is None


async def test_a_role_change_applies_at_once(
    client: AsyncClient, owner: Account, member: Account
) -> None:
    changed = await gql(
        client,
        "mutation($id: ID!) { setUserRole(userId: $id, role: VIEWER) { role } }",
        owner.headers,
        id=str(member.user_id),
    )
    assert changed["data"]["setUserRole"] == {"role": "VIEWER"}
    assert code(await gql(client, ME, member.headers)) == "UNAUTHENTICATED"
    refreshed = await token(client, grant_type="refresh_token", refresh_token=member.refresh_token)
    me = await gql(client, ME, bearer(refreshed["access_token"]))
    assert me["data"]["me"]["role"] == "VIEWER"


async def test_a_revoked_key_stays_refused_though_a_replica_cached_it_late(
    client: AsyncClient, app: FastAPI, redis: Redis, member: Account
) -> None:
    """A replica that read the key from the database just before the revocation committed
    writes its cache entry after the revocation cleared it: the key's record still refuses."""
    created = (await gql(client, CREATE_KEY, member.headers))["data"]["createApiKey"]
    assert code(await gql(client, ME, bearer(created["secret"]))) is None
    cached = [key async for key in redis.scan_iter(match="*auth:apikey:*")]
    prefix = app.state.sightline.keys("")
    cached = [k for k in cached if k.decode().startswith(prefix)]
    assert len(cached) == 1
    stale = await redis.get(cached[0])
    await gql(
        client,
        "mutation($id: ID!) { revokeApiKey(id: $id) { id } }",
        member.headers,
        id=created["apiKey"]["id"],
    )
    await redis.set(cached[0], stale, ex=60)  # the late write of the racing replica
    assert code(await gql(client, ME, bearer(created["secret"]))) == "UNAUTHENTICATED"


async def test_a_deleted_user_s_token_is_unauthenticated_not_a_server_error(
    client: AsyncClient, app: FastAPI, owner: Account, member: Account
) -> None:
    """Deleted behind the API's back (no revocation recorded): writes that name the user are
    refused as UNAUTHENTICATED, not a foreign-key violation answered 500."""
    async with app.state.sightline.db.session(owner.tenant.id) as session:
        await session.execute(delete(User).where(User.id == member.user_id))
    for mutation in ('mutation { createConversation(title: "t") { id } }', CREATE_KEY):
        body = await gql(client, mutation, member.headers)
        assert code(body) == "UNAUTHENTICATED", body
        assert body["errors"][0]["message"] == "the account no longer exists"


async def test_erasing_a_user_ends_what_they_hold(
    client: AsyncClient, app: FastAPI, services: Services, owner: Account, member: Account
) -> None:
    """What user erasure calls after deleting the rows: every credential is refused at once."""
    key = (await gql(client, CREATE_KEY, member.headers))["data"]["createApiKey"]["secret"]
    assert code(await gql(client, ME, bearer(key))) is None  # cached
    async with app.state.sightline.db.session(owner.tenant.id) as session:
        await session.execute(delete(User).where(User.id == member.user_id))
    await services.auth.end_sessions_of(member.user_id)
    for credential in (member.headers, bearer(key)):
        assert code(await gql(client, ME, credential)) == "UNAUTHENTICATED"


# -- open streams, across replicas ---------------------------------------------------------------


@dataclass
class Tenant:
    """A tenant in the shared database (live servers do not see the test's transaction)."""

    slug: str
    owner: str
    member: str


@pytest.fixture
async def shared_tenant(settings: Settings, engine: AsyncEngine) -> AsyncIterator[Tenant]:
    db = Database.connect(engine.url.render_as_string(hide_password=False), settings.database)
    redis = Redis.from_url(settings.redis.url.get_secret_value())  # type: ignore[union-attr]
    try:
        signer = build_signer(settings)
        async with db.session() as session:
            await signer.load(session)
        auth = AuthService(db, signer, redis, KeySpace(settings.redis.key_prefix), settings.auth)
        slug = f"t-{uuid.uuid4().hex[:10]}"
        tenant = await auth.ensure_tenant(slug, "Revocation")
        emails = []
        for role in (UserRole.OWNER, UserRole.MEMBER):
            email = f"{role.value}@{slug}.example"
            await auth.create_user(tenant_id=tenant.id, email=email, password=PASSWORD, role=role)
            emails.append(email)
        yield Tenant(slug, *emails)
    finally:
        await redis.aclose()
        await db.dispose()


@asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[tuple[LiveServer, AsyncClient]]:
    async with serve_live(settings) as server, AsyncClient(base_url=server.http_url) as http:
        yield server, http


async def signed_in(http: AsyncClient, tenant: Tenant, email: str) -> dict[str, Any]:
    body = await token(
        http, grant_type="password", tenant=tenant.slug, username=email, password=PASSWORD
    )
    assert body["status"] == 200, body
    return body


async def stream(server: LiveServer, credential: str) -> ClientConnection:
    """A socket signed in with `credential`, streaming heartbeats (two seen)."""
    ws = await open_socket(server.ws_url)
    await init(ws, {"authorization": f"Bearer {credential}"})
    await subscribe(ws, HEARTBEAT)
    for _ in range(2):
        assert (await receive(ws))["type"] == "next"
    return ws


async def ended(ws: ClientConnection) -> dict[str, Any]:
    """Reads heartbeats until the stream ends; returns its error (the test fails on a stream
    that goes on: `receive` times out)."""
    while True:
        message = await receive(ws, timeout=20)
        payload = message.get("payload")
        if message["type"] == "error":
            return payload[0]
        if message["type"] == "next" and payload.get("errors"):
            return payload["errors"][0]
        if message["type"] == "complete":  # of an operation that ended before
            continue
        assert message["type"] == "next", message


async def test_revocations_end_open_streams_on_another_replica(
    settings: Settings, shared_tenant: Tenant
) -> None:
    # No re-check within the test: only the published revocation can end the streams.
    settings.auth.revocation_check_interval_s = 3600
    async with replica(settings) as (a, http_a), replica(settings) as (_, http_b):
        member = await signed_in(http_a, shared_tenant, shared_tenant.member)
        owner = await signed_in(http_b, shared_tenant, shared_tenant.owner)
        created = await gql(http_a, CREATE_KEY, bearer(member["access_token"]))
        key = created["data"]["createApiKey"]
        by_token = await stream(a, member["access_token"])
        by_key = await stream(a, key["secret"])

        # Logout on B ends the session's stream on A; the key's stream goes on.
        assert (
            await http_b.post("/oauth/revoke", data={"token": member["refresh_token"]})
        ).is_success
        error = await ended(by_token)
        assert error["extensions"]["code"] == "UNAUTHENTICATED"
        assert "revoked" in error["message"]
        # The socket stays refused: a new subscription on it is UNAUTHENTICATED too.
        await subscribe(by_token, HEARTBEAT, op_id="2")
        assert (await ended(by_token))["extensions"]["code"] == "UNAUTHENTICATED"
        assert (await receive(by_key))["type"] == "next"

        # The owner revokes the key on B: its stream on A ends.
        await gql(
            http_b,
            "mutation($id: ID!) { revokeApiKey(id: $id) { id } }",
            bearer(owner["access_token"]),
            id=key["apiKey"]["id"],
        )
        error = await ended(by_key)
        assert (error["extensions"]["code"], error["message"]) == (
            "UNAUTHENTICATED",
            "API key revoked",
        )

        # Disabling the user on B ends a new session's stream on A.
        again = await signed_in(http_a, shared_tenant, shared_tenant.member)
        by_new_token = await stream(a, again["access_token"])
        me = await gql(http_a, ME, bearer(again["access_token"]))
        await gql(
            http_b,
            "mutation($id: ID!) { setUserActive(userId: $id, active: false) { id } }",
            bearer(owner["access_token"]),
            id=me["data"]["me"]["userId"],
        )
        assert (await ended(by_new_token))["extensions"]["code"] == "UNAUTHENTICATED"
        for ws in (by_token, by_key, by_new_token):
            await ws.close()


async def test_a_missed_revocation_message_is_caught_by_the_re_check(
    settings: Settings, shared_tenant: Tenant, redis: Redis
) -> None:
    """The record is written but never published (a subscriber that was reconnecting): the
    periodic re-check ends the stream."""
    settings.auth.revocation_check_interval_s = 0.5
    async with replica(settings) as (server, http):
        member = await signed_in(http, shared_tenant, shared_tenant.member)
        ws = await stream(server, member["access_token"])
        claims = json.loads(base64.urlsafe_b64decode(member["access_token"].split(".")[1] + "=="))
        record = KeySpace(settings.redis.key_prefix).child("revoked")("session", claims["sid"])
        await redis.set(record, "1", ex=60)
        error = await ended(ws)
        assert error["extensions"]["code"] == "UNAUTHENTICATED"
        await ws.close()


async def test_revocation_ends_a_live_camera_socket(
    settings: Settings, shared_tenant: Tenant
) -> None:
    settings.auth.revocation_check_interval_s = 3600  # only the published revocation
    settings.vision = VisionSettings(enabled=True, workers=1)
    async with replica(settings) as (server, http):
        member = await signed_in(http, shared_tenant, shared_tenant.member)
        url = server.ws_url.replace("/graphql", "/ws/vision/live?tasks=detect")
        async with connect(url, open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "auth", "token": member["access_token"]}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
            assert (
                await http.post("/oauth/revoke", data={"token": member["refresh_token"]})
            ).is_success
            error = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert (error["type"], error["code"]) == ("error", "UNAUTHENTICATED")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4403
