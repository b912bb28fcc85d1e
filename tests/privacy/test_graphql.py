"""Data protection through the API: the policy, erasure and exports as an admin, a user and a
platform operator use them; every refusal typed."""

from __future__ import annotations

import uuid

import pytest
from httpx import AsyncClient

from backend.config import PrivacySettings, Settings
from backend.core.models import UserRole
from backend.services import Services
from tests.accounts import Account, sign_in
from tests.auth.test_graphql_auth import code, gql

OPERATORS = f"ops-{uuid.uuid4().hex[:8]}"

POLICY = "{ privacyPolicy { storeMessagesRedacted retention { messagesDays auditDays } } }"
UPDATE = """mutation($r: RetentionInput, $s: Boolean, $reset: Boolean! = false) {
  updatePrivacyPolicy(retention: $r, storeMessagesRedacted: $s, reset: $reset) {
    storeMessagesRedacted retention { messagesDays documentsDays auditDays } } }"""
ERASE_USER = """mutation($id: ID!) { eraseUser(userId: $id) {
  subject status removed { conversations messages users } } }"""
ERASE_TENANT = (
    "mutation($id: ID!) { eraseTenant(tenantId: $id) { subject status removed { users } } }"
)
EXPORT = "mutation($id: ID!) { exportUserData(userId: $id) { url expiresAt } }"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.privacy = PrivacySettings(operator_tenant=OPERATORS, purge_enabled=False)
    return settings


async def test_admins_read_and_change_the_policy(
    client: AsyncClient, owner: Account, member: Account
) -> None:
    assert code(await gql(client, POLICY, member.headers)) == "FORBIDDEN"
    assert code(await gql(client, UPDATE, member.headers, s=True)) == "FORBIDDEN"
    policy = (await gql(client, POLICY, owner.headers))["data"]["privacyPolicy"]
    assert policy == {
        "storeMessagesRedacted": False,
        "retention": {"messagesDays": None, "auditDays": 365},
    }
    changed = await gql(client, UPDATE, owner.headers, r={"messagesDays": 30, "auditDays": None})
    assert changed["data"]["updatePrivacyPolicy"] == {
        "storeMessagesRedacted": False,
        "retention": {"messagesDays": 30, "documentsDays": None, "auditDays": None},
    }
    # a field left out is unchanged; null means forever
    kept = await gql(client, UPDATE, owner.headers, r={"documentsDays": 7}, s=True)
    assert kept["data"]["updatePrivacyPolicy"]["retention"]["messagesDays"] == 30
    assert kept["data"]["updatePrivacyPolicy"]["storeMessagesRedacted"] is True
    for bad in ({"messagesDays": 0}, {"auditDays": 10**9}):
        body = await gql(client, UPDATE, owner.headers, r=bad)
        assert code(body) == "BAD_USER_INPUT", body
        assert body["errors"][0]["extensions"]["problems"]
    wrong_type = await gql(client, UPDATE, owner.headers, r={"messagesDays": "soon"})
    assert code(wrong_type) == "BAD_USER_INPUT"
    reset = await gql(client, UPDATE, owner.headers, reset=True)
    assert reset["data"]["updatePrivacyPolicy"]["retention"]["messagesDays"] is None
    purged = await gql(
        client, "mutation { purgeExpiredData { messages auditEvents } }", owner.headers
    )
    assert purged["data"]["purgeExpiredData"] == {"messages": 0, "auditEvents": 0}
    audit = await gql(
        client, '{ auditEvents(event: "privacy.policy_updated") { actorId } }', owner.headers
    )
    assert len(audit["data"]["auditEvents"]) == 3
    assert {e["actorId"] for e in audit["data"]["auditEvents"]} == {str(owner.user_id)}


async def test_an_admin_erases_a_user(client: AsyncClient, owner: Account, member: Account) -> None:
    created = await gql(
        client, 'mutation { createConversation(title: "mine") { id } }', member.headers
    )
    assert "errors" not in created
    assert code(await gql(client, ERASE_USER, member.headers, id=str(owner.user_id))) == "FORBIDDEN"
    assert code(await gql(client, ERASE_USER, owner.headers, id="nope")) == "BAD_USER_INPUT"

    erased = await gql(client, ERASE_USER, owner.headers, id=str(member.user_id))

    result = erased["data"]["eraseUser"]
    assert result["status"] == "COMPLETED"
    assert result["removed"] == {"conversations": 1, "messages": 0, "users": 1}
    users = (await gql(client, "{ users { id email } }", owner.headers))["data"]["users"]
    assert str(member.user_id) not in {u["id"] for u in users}
    # the erased member's access token ends with the erasure, not when it expires
    reading = await gql(
        client, "{ conversations(first: 5) { edges { node { id } } } }", member.headers
    )
    assert code(reading) == "UNAUTHENTICATED"
    again = await gql(client, ERASE_USER, owner.headers, id=str(member.user_id))
    assert again["data"]["eraseUser"]["subject"] == result["subject"]
    # the last owner stays
    refused = await gql(client, ERASE_USER, owner.headers, id=str(owner.user_id))
    assert code(refused) == "ERASURE_REFUSED"
    log = await gql(client, "{ auditEvents(first: 100) { event details } }", owner.headers)
    events = log["data"]["auditEvents"]
    erasure = next(e for e in events if e["event"] == "privacy.user_erased")
    assert erasure["details"]["subject"] == result["subject"]
    assert not [e for e in events if member.email in str(e["details"])]
    # the member cannot sign in again (an attempt is audited, after the erasure)
    response = await client.post(
        "/oauth/token",
        data={
            "grant_type": "password",
            "tenant": member.tenant.slug,
            "username": member.email,
            "password": "correct horse battery staple",
        },
    )
    assert response.status_code == 400


async def test_exports_download_once_to_their_requester(
    client: AsyncClient, owner: Account, member: Account
) -> None:
    assert code(await gql(client, EXPORT, member.headers, id=str(owner.user_id))) == "NOT_FOUND"
    ticket = (await gql(client, EXPORT, member.headers, id=str(member.user_id)))["data"]
    url = ticket["exportUserData"]["url"]
    assert url.startswith("/privacy/exports/")

    anonymous = await client.get(url)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "UNAUTHENTICATED"
    forged = await client.get(url, headers={"authorization": "Bearer nope"})
    assert forged.status_code == 401
    stolen = await client.get(url, headers=owner.headers)  # not its requester
    assert stolen.status_code == 410
    assert stolen.json()["error"]["code"] == "EXPORT_GONE"

    download = await client.get(url, headers=member.headers)
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/json"
    assert "attachment" in download.headers["content-disposition"]
    archive = download.json()
    assert archive["user"]["email"] == member.email
    assert archive["conversations"] == []
    assert (await client.get(url, headers=member.headers)).status_code == 410  # once
    other = (await gql(client, EXPORT, owner.headers, id=str(member.user_id)))["data"]
    done = await client.get(other["exportUserData"]["url"], headers=owner.headers)
    assert done.json()["user"]["id"] == str(member.user_id)  # an admin exports anyone's


async def test_only_platform_operators_erase_tenants(
    client: AsyncClient, services: Services, owner: Account, stranger: Account
) -> None:
    operators = await services.auth.ensure_tenant(OPERATORS, "Operators")
    await services.auth.create_user(
        tenant_id=operators.id,
        email="root@ops.example",
        password="correct horse battery staple",
        role=UserRole.OWNER,
    )
    root = await sign_in(client, operators, "root@ops.example")
    assert (
        code(await gql(client, ERASE_TENANT, owner.headers, id=str(owner.tenant.id))) == "FORBIDDEN"
    )
    assert (
        code(await gql(client, ERASE_TENANT, owner.headers, id=str(stranger.tenant.id)))
        == "NOT_FOUND"
    )
    assert (
        code(await gql(client, ERASE_TENANT, root.headers, id=str(operators.id)))
        == "ERASURE_REFUSED"
    )
    erased = await gql(client, ERASE_TENANT, root.headers, id=str(stranger.tenant.id))
    assert erased["data"]["eraseTenant"]["status"] == "COMPLETED"
    assert erased["data"]["eraseTenant"]["removed"] == {"users": 1}
    again = await gql(client, ERASE_TENANT, root.headers, id=str(stranger.tenant.id))
    assert again["data"]["eraseTenant"]["status"] == "COMPLETED"
    log = await gql(
        client, '{ auditEvents(event: "privacy.tenant_erased") { details } }', root.headers
    )
    (entry,) = log["data"]["auditEvents"]
    assert entry["details"]["slug"] == stranger.tenant.slug
