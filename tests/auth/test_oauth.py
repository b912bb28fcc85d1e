"""The token endpoint: grants, refresh rotation and reuse, JWKS (throttling: elsewhere)."""

from __future__ import annotations

from httpx import AsyncClient

from backend.core.models import UserKind, UserRole
from backend.services import Services
from tests.accounts import PASSWORD, Account, make_tenant, token


async def test_password_grant_issues_tokens(client: AsyncClient, owner: Account) -> None:
    response = await client.post(
        "/graphql", json={"query": "{ me { role scopes credential } }"}, headers=owner.headers
    )
    me = response.json()["data"]["me"]
    assert me["role"] == "OWNER"
    assert "admin" in me["scopes"]
    assert me["credential"] == "access_token"


async def test_wrong_password_and_unknown_user_look_the_same(
    client: AsyncClient, owner: Account
) -> None:
    wrong = await token(
        client,
        grant_type="password",
        tenant=owner.tenant.slug,
        username=owner.email,
        password="nope-nope-nope",
    )
    unknown = await token(
        client,
        grant_type="password",
        tenant=owner.tenant.slug,
        username="ghost@example.com",
        password=PASSWORD,
    )
    unknown_tenant = await token(
        client,
        grant_type="password",
        tenant="no-such-tenant",
        username=owner.email,
        password=PASSWORD,
    )
    for body in (wrong, unknown, unknown_tenant):
        assert body["status"] == 400
        assert body["error"] == "invalid_grant"
        assert body["error_description"] == "invalid username or password"


async def test_unsupported_grant_and_missing_fields(client: AsyncClient) -> None:
    assert (await token(client, grant_type="implicit"))["error"] == "unsupported_grant_type"
    body = await token(client, grant_type="password", username="a@b.c")
    assert (body["status"], body["error"]) == (400, "invalid_request")


async def test_scope_can_be_narrowed_not_widened(client: AsyncClient, member: Account) -> None:
    narrowed = await token(
        client,
        grant_type="password",
        tenant=member.tenant.slug,
        username=member.email,
        password=PASSWORD,
        scope="chat",
    )
    assert narrowed["scope"] == "chat"
    widened = await token(
        client,
        grant_type="password",
        tenant=member.tenant.slug,
        username=member.email,
        password=PASSWORD,
        scope="admin",
    )
    assert widened["error"] == "invalid_scope"


async def test_refresh_rotates_and_reuse_revokes_the_family(
    client: AsyncClient, owner: Account
) -> None:
    first = await token(client, grant_type="refresh_token", refresh_token=owner.refresh_token)
    assert first["status"] == 200
    assert first["refresh_token"] != owner.refresh_token
    second = await token(client, grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert second["status"] == 200

    replayed = await token(client, grant_type="refresh_token", refresh_token=owner.refresh_token)
    assert replayed["error"] == "invalid_grant"
    # The newest token of the family is dead too: the thief and the victim both sign in again.
    after = await token(client, grant_type="refresh_token", refresh_token=second["refresh_token"])
    assert after["error"] == "invalid_grant"

    again = await token(
        client,
        grant_type="password",
        tenant=owner.tenant.slug,
        username=owner.email,
        password=PASSWORD,
    )
    audit = await client.post(
        "/graphql",
        json={"query": '{ auditEvents(event: "refresh_token.reuse") { outcome } }'},
        headers={"authorization": f"Bearer {again['access_token']}"},
    )
    assert audit.json()["data"]["auditEvents"] == [{"outcome": "denied"}]


async def test_logout_ends_the_session(client: AsyncClient, owner: Account) -> None:
    assert (
        await client.post("/oauth/revoke", data={"token": owner.refresh_token})
    ).status_code == 200
    body = await token(client, grant_type="refresh_token", refresh_token=owner.refresh_token)
    assert body["error"] == "invalid_grant"


async def test_client_credentials_for_a_service_account(
    client: AsyncClient, services: Services
) -> None:
    tenant, _ = await make_tenant(services)
    robot = await services.auth.create_user(
        tenant_id=tenant.id,
        email=f"robot@{tenant.slug}.example",
        password=None,
        role=UserRole.MEMBER,
        kind=UserKind.SERVICE,
    )
    client_row, secret = await services.auth.create_client(tenant.id, robot.id, ["vision"])
    body = await token(
        client,
        grant_type="client_credentials",
        client_id=client_row.client_id,
        client_secret=secret,
    )
    assert body["status"] == 200
    assert body["scope"] == "vision"
    assert "refresh_token" not in body
    bad = await token(
        client,
        grant_type="client_credentials",
        client_id=client_row.client_id,
        client_secret=secret + "x",
    )
    assert (bad["status"], bad["error"]) == (401, "invalid_client")
    # A service account cannot use the password grant.
    nopw = await token(
        client, grant_type="password", tenant=tenant.slug, username=robot.email, password=""
    )
    assert nopw["status"] == 400


async def test_jwks_publishes_the_verifying_keys(client: AsyncClient) -> None:
    keys = (await client.get("/.well-known/jwks.json")).json()["keys"]
    assert keys
    assert all(k["kty"] == "OKP" and k["crv"] == "Ed25519" and "d" not in k for k in keys)
