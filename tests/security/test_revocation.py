"""Revocation ends sessions at once: requests with a revoked credential are refused on the next
call, and open subscriptions end with UNAUTHENTICATED on every replica."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from httpx import AsyncClient
from redis.asyncio import Redis
from sqlalchemy import delete

from backend.app import Services
from backend.config import Settings
from backend.core.models import User, UserRole
from tests.accounts import PASSWORD, Account, sign_in, token

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
    client: AsyncClient, app: FastAPI, services: Services, owner: Account, member: Account
) -> None:
    async with app.state.sightline.db.session(owner.tenant.id) as session:
        await session.execute(delete(User).where(User.id == member.user_id))
    await services.auth.end_sessions_of(member.user_id)
    create = await gql(client, 'mutation { createConversation(title: "t") { id } }', member.headers)
    assert code(create) == "UNAUTHENTICATED"
