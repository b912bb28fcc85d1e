"""Identity through GraphQL: API keys, roles and scopes, tenant isolation, audit, WebSockets."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from httpx import AsyncClient
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.auth.errors import InvalidToken
from backend.auth.principal import CredentialKind, Principal
from backend.auth.revocation import CredentialWatch
from backend.auth.scopes import Scope
from backend.auth.signing import TokenSigner
from backend.config import Settings
from backend.core.db import Database
from backend.core.models import (
    Chunk,
    Document,
    IngestionJob,
    Run,
    RunStatus,
    UserRole,
    VisionJob,
)
from tests.accounts import Account
from tests.conftest import LiveServer, scaled
from tests.graphql.ws import init, open_socket, receive, send, subscribe


async def gql(
    client: AsyncClient, query: str, headers: dict[str, str] | None = None, **variables: Any
) -> dict[str, Any]:
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables}, headers=headers or {}
    )
    return response.json()


def code(body: dict[str, Any]) -> str:
    return body["errors"][0]["extensions"]["code"]


CREATE_KEY = """mutation($name: String!, $scopes: [String!]) {
  createApiKey(name: $name, scopes: $scopes) { secret apiKey { id prefix scopes } } }"""


async def test_api_key_lifecycle(client: AsyncClient, member: Account) -> None:
    created = await gql(client, CREATE_KEY, member.headers, name="ci", scopes=["chat"])
    key = created["data"]["createApiKey"]
    assert key["secret"].startswith(key["apiKey"]["prefix"] + "_")
    assert key["apiKey"]["scopes"] == ["chat"]

    as_key = {"authorization": f"Bearer {key['secret']}"}
    me = await gql(client, "{ me { credential scopes } }", as_key)
    assert me["data"]["me"] == {"credential": "api_key", "scopes": ["chat"]}
    also = await gql(client, "{ me { credential } }", {"x-api-key": key["secret"]})
    assert also["data"]["me"]["credential"] == "api_key"

    listed = await gql(client, "{ apiKeys { prefix lastUsedAt } }", member.headers)
    assert listed["data"]["apiKeys"][0]["lastUsedAt"] is not None  # use was recorded

    revoked = await gql(
        client,
        "mutation($id: ID!) { revokeApiKey(id: $id) { revokedAt } }",
        member.headers,
        id=key["apiKey"]["id"],
    )
    assert revoked["data"]["revokeApiKey"]["revokedAt"]
    assert code(await gql(client, "{ me { userId } }", as_key)) == "UNAUTHENTICATED"


async def test_a_key_never_exceeds_its_creator(client: AsyncClient, member: Account) -> None:
    body = await gql(client, CREATE_KEY, member.headers, name="x", scopes=["admin"])
    assert code(body) == "FORBIDDEN"
    body = await gql(client, CREATE_KEY, member.headers, name="x", scopes=["no-such-scope"])
    assert code(body) == "BAD_USER_INPUT"
    body = await gql(client, CREATE_KEY, member.headers, name="  ")
    assert code(body) == "BAD_USER_INPUT"


async def test_malformed_and_unknown_api_keys(client: AsyncClient) -> None:
    for bad in ("sl_0123456789ab_" + "x" * 43, "sl_short", "Bearer ", "sl_" + "z" * 80):
        body = await gql(client, "{ me { userId } }", {"authorization": bad})
        assert code(body) == "UNAUTHENTICATED", bad


async def test_anonymous_callers_get_public_fields_only(client: AsyncClient) -> None:
    assert (await gql(client, "{ serverInfo { version } }"))["data"]
    assert code(await gql(client, "{ me { userId } }")) == "UNAUTHENTICATED"
    assert code(await gql(client, "{ users { id } }")) == "UNAUTHENTICATED"


async def test_scopes_and_roles_are_enforced_and_denials_audited(
    client: AsyncClient, owner: Account, member: Account
) -> None:
    assert code(await gql(client, "{ users { email } }", member.headers)) == "FORBIDDEN"
    body = await gql(
        client,
        'mutation { inviteUser(email: "x@y.example") { temporaryPassword } }',
        member.headers,
    )
    assert code(body) == "FORBIDDEN"
    audit = await gql(
        client, '{ auditEvents(event: "permission.denied") { actorId details } }', owner.headers
    )
    events = audit["data"]["auditEvents"]
    assert {e["details"]["what"] for e in events} == {"Query.users", "Mutation.inviteUser"}
    assert {e["actorId"] for e in events} == {str(member.user_id)}


async def test_admin_manages_users(client: AsyncClient, owner: Account) -> None:
    invited = await gql(
        client,
        'mutation { inviteUser(email: "new@x.example", role: VIEWER) '
        "{ temporaryPassword user { id role } } }",
        owner.headers,
    )
    user = invited["data"]["inviteUser"]["user"]
    assert user["role"] == "VIEWER"
    changed = await gql(
        client,
        "mutation($id: ID!) { setUserRole(userId: $id, role: ADMIN) { role } }",
        owner.headers,
        id=user["id"],
    )
    assert changed["data"]["setUserRole"]["role"] == "ADMIN"
    # The last owner cannot be demoted.
    last = await gql(
        client,
        "mutation($id: ID!) { setUserRole(userId: $id, role: MEMBER) { role } }",
        owner.headers,
        id=str(owner.user_id),
    )
    assert code(last) == "CONFLICT"
    dup = await gql(
        client, 'mutation { inviteUser(email: "NEW@x.example") { user { id } } }', owner.headers
    )
    assert code(dup) == "CONFLICT"


async def test_other_tenants_ids_are_not_found(
    client: AsyncClient, owner: Account, stranger: Account, app: Any
) -> None:
    """Every field taking an id, called with an id from another tenant."""
    key = (await gql(client, CREATE_KEY, stranger.headers, name="theirs"))["data"]
    their_key = key["createApiKey"]["apiKey"]["id"]
    theirs = await gql(
        client, 'mutation { createConversation(title: "t") { id } }', stranger.headers
    )
    their_chat = {"id": theirs["data"]["createConversation"]["id"]}
    async with app.state.sightline.db.session(stranger.tenant.id) as session:
        their_run = Run(
            tenant_id=stranger.tenant.id,
            conversation_id=uuid.UUID(their_chat["id"]),
            user_id=stranger.user_id,
            status=RunStatus.RUNNING,
            model="m",
        )
        session.add(their_run)
        their_document = Document(
            tenant_id=stranger.tenant.id,
            source="theirs.md",
            title="Theirs",
            media_type="text/markdown",
            content_hash="0" * 64,
            size_bytes=1,
            embedding_model="m",
        )
        session.add(their_document)
        await session.flush()
        their_chunk = Chunk(
            tenant_id=stranger.tenant.id,
            document_id=their_document.id,
            ord=0,
            text="secret",
            embedding_model="m",
            char_start=0,
            char_end=6,
            content_hash="0" * 64,
        )
        their_job = IngestionJob(tenant_id=stranger.tenant.id, source="theirs.md", status="queued")
        their_analysis = VisionJob(
            tenant_id=stranger.tenant.id,
            status="completed",
            tasks=["ocr"],
            media_type="image/png",
            width=1,
            height=1,
            size_bytes=1,
            sha256="0" * 64,
        )
        session.add_all([their_chunk, their_job, their_analysis])
    document = {"id": str(their_document.id)}
    calls = {
        "document": ("query($id: ID!) { document(id: $id) { id } }", document),
        "chunk": ("query($id: ID!) { chunk(id: $id) { id } }", {"id": str(their_chunk.id)}),
        "ingestionJob": (
            "query($id: ID!) { ingestionJob(id: $id) { id } }",
            {"id": str(their_job.id)},
        ),
        "deleteDocument": ("mutation($id: ID!) { deleteDocument(id: $id) }", document),
        "visionJob": (
            "query($id: ID!) { visionJob(id: $id) { id } }",
            {"id": str(their_analysis.id)},
        ),
        "sendMessage": (
            'mutation($id: ID!) { sendMessage(conversationId: $id, content: "hi") { run { id } } }',
            their_chat,
        ),
        "run": ("query($id: ID!) { run(id: $id) { id } }", {"id": str(their_run.id)}),
        "cancelRun": (
            "mutation($id: ID!) { cancelRun(runId: $id) { id } }",
            {"id": str(their_run.id)},
        ),
        "revokeApiKey": ("mutation($id: ID!) { revokeApiKey(id: $id) { id } }", {"id": their_key}),
        "conversation": ("query($id: ID!) { conversation(id: $id) { id } }", their_chat),
        "renameConversation": (
            'mutation($id: ID!) { renameConversation(id: $id, title: "x") { id } }',
            their_chat,
        ),
        "archiveConversation": (
            "mutation($id: ID!) { archiveConversation(id: $id) { id } }",
            their_chat,
        ),
        "deleteConversation": ("mutation($id: ID!) { deleteConversation(id: $id) }", their_chat),
        "setUserRole": (
            "mutation($id: ID!) { setUserRole(userId: $id, role: VIEWER) { id } }",
            {"id": str(stranger.user_id)},
        ),
        "setUserActive": (
            "mutation($id: ID!) { setUserActive(userId: $id, active: false) { id } }",
            {"id": str(stranger.user_id)},
        ),
        "eraseUser": (
            "mutation($id: ID!) { eraseUser(userId: $id) { status } }",
            {"id": str(stranger.user_id)},
        ),
        "exportUserData": (
            "mutation($id: ID!) { exportUserData(userId: $id) { url } }",
            {"id": str(stranger.user_id)},
        ),
        "eraseTenant": (  # the owner is no platform operator: other tenants do not exist
            "mutation($id: ID!) { eraseTenant(tenantId: $id) { status } }",
            {"id": str(stranger.tenant.id)},
        ),
        "pinModelVersion": (
            'mutation($id: ID!) { pinModelVersion(model: "m", version: "1", tenantId: $id) '
            "{ version } }",
            {"id": str(stranger.tenant.id)},
        ),
        "unpinModelVersion": (
            'mutation($id: ID!) { unpinModelVersion(model: "m", tenantId: $id) }',
            {"id": str(stranger.tenant.id)},
        ),
    }
    # Every field that takes an id must be in `calls`: a new one fails here until it is.
    schema = (
        await gql(
            client,
            "{ __schema { queryType { fields { name args { type { name "
            "ofType { name } } } } } mutationType { fields { name args { type { "
            "name ofType { name } } } } } } }",
        )
    )["data"]["__schema"]
    taking_ids = {
        field["name"]
        for root in (schema["queryType"], schema["mutationType"])
        for field in root["fields"]
        for arg in field["args"]
        if "ID" in (arg["type"]["name"], (arg["type"]["ofType"] or {}).get("name"))
    }
    assert taking_ids - {"auditEvents"} == set(calls)  # auditEvents' id is a cursor, below
    for name, (query, variables) in calls.items():
        body = await gql(client, query, owner.headers, **variables)
        assert code(body) == "NOT_FOUND", name
    users = (await gql(client, "{ users { id } }", owner.headers))["data"]["users"]
    assert str(stranger.user_id) not in {u["id"] for u in users}
    keys = (await gql(client, "{ apiKeys(allUsers: true) { id } }", owner.headers))["data"]
    assert their_key not in {k["id"] for k in keys["apiKeys"]}
    # The stranger's key still works: nothing was revoked across the tenant boundary.
    me = await gql(
        client, "{ me { tenantId } }", {"authorization": f"Bearer {key['createApiKey']['secret']}"}
    )
    assert me["data"]["me"]["tenantId"] == str(stranger.tenant.id)


async def test_invalid_ids_are_bad_input(client: AsyncClient, owner: Account) -> None:
    body = await gql(client, 'mutation { revokeApiKey(id: "not-a-uuid") { id } }', owner.headers)
    assert code(body) == "BAD_USER_INPUT"


async def test_login_mutation_for_the_demo_ui(client: AsyncClient, owner: Account) -> None:
    from tests.accounts import PASSWORD

    body = await gql(
        client,
        "mutation($t: String!, $e: String!, $p: String!) "
        "{ login(tenant: $t, email: $e, password: $p) { accessToken refreshToken } }",
        t=owner.tenant.slug,
        e=owner.email,
        p=PASSWORD,
    )
    assert body["data"]["login"]["accessToken"]
    body = await gql(
        client,
        "mutation($t: String!, $e: String!) "
        '{ login(tenant: $t, email: $e, password: "wrong-wrong") { accessToken } }',
        t=owner.tenant.slug,
        e=owner.email,
    )
    assert code(body) == "INVALID_GRANT"


async def live_token(settings: Settings, engine: AsyncEngine, ttl_s: int) -> str:
    """An access token the live server accepts: access tokens need no database, only the
    signing key the live server made (read here from the shared database)."""
    signer = TokenSigner(
        secret_key=settings.security.secret_key.get_secret_value(),
        issuer=settings.auth.issuer,
        audience=settings.auth.audience,
        access_ttl_s=ttl_s,
        clock_skew_s=0,
        grace_s=60,
    )
    db = Database.connect(engine.url.render_as_string(hide_password=False), settings.database)
    try:
        async with db.session() as session:
            await signer.load(session)
    finally:
        await db.dispose()
    token, _ = signer.issue(
        user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), role="member", scopes=["chat"], plan="free"
    )
    return token


# -- WebSockets --------------------------------------------------------------------------------


async def test_socket_with_a_bad_token_closes_4403(live_server: LiveServer) -> None:
    from websockets.exceptions import ConnectionClosed

    async with await open_socket(live_server.ws_url) as ws:
        await send(ws, {"type": "connection_init", "payload": {"authorization": "Bearer nope"}})
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4403


async def test_socket_authenticates_in_connection_init(
    live_server: LiveServer, settings: Settings, engine: AsyncEngine
) -> None:
    token = await live_token(settings, engine, ttl_s=60)
    async with await open_socket(live_server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        await subscribe(ws, "subscription { heartbeat(intervalMs: 100, count: 1) { seq } }")
        assert (await receive(ws))["type"] == "next"


async def test_stream_ends_when_the_credential_expires() -> None:
    principal = Principal(
        user_id=__import__("uuid").uuid4(),
        tenant_id=__import__("uuid").uuid4(),
        role=UserRole.MEMBER,
        scopes=frozenset({Scope.CHAT}),
        credential=CredentialKind.ACCESS_TOKEN,
        expires_at=time.time() + 0.3,
    )

    async def forever() -> Any:
        n = 0
        while True:
            yield n
            n += 1
            await __import__("asyncio").sleep(0.05)

    seen = []
    from backend.auth.errors import InvalidToken

    with pytest.raises(InvalidToken, match="expired"):
        async for item in CredentialWatch(principal).relay(forever()):
            seen.append(item)
    assert 3 <= len(seen) <= 8


def _principal(expires_in_s: float | None = None) -> Principal:
    return Principal(
        user_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        role=UserRole.MEMBER,
        scopes=frozenset({Scope.CHAT}),
        credential=CredentialKind.ACCESS_TOKEN,
        expires_at=None if expires_in_s is None else time.time() + expires_in_s,
    )


async def _waiting_stream(waiting: asyncio.Event, closed: list[bool]) -> AsyncIterator[int]:
    """One item, then a wait for the next that never ends (a model thinking)."""
    try:
        yield 0
        waiting.set()
        await asyncio.Event().wait()
        yield 1
    finally:
        closed.append(True)


async def test_a_revocation_stops_a_relay_waiting_for_its_next_item() -> None:
    watch = CredentialWatch(_principal(expires_in_s=3600))
    waiting, closed, seen = asyncio.Event(), [], []

    async def read() -> None:
        async for item in watch.relay(_waiting_stream(waiting, closed)):
            seen.append(item)

    reader = asyncio.create_task(read())
    await asyncio.wait_for(waiting.wait(), scaled(10))
    watch.end("session revoked; sign in again")
    with pytest.raises(InvalidToken, match="revoked"):
        await asyncio.wait_for(reader, scaled(10))
    assert seen == [0]
    assert closed == [True]  # the stream was closed with the relay
    assert reader.cancelling() == 0  # the relay's own cancellation was withdrawn


async def test_a_relay_cancelled_by_its_reader_stays_cancelled() -> None:
    """A revocation that comes with the reader's own cancellation does not turn it into
    UNAUTHENTICATED: the reader's cancellation wins."""
    watch = CredentialWatch(_principal())
    waiting, closed = asyncio.Event(), []

    async def read() -> None:
        async for _ in watch.relay(_waiting_stream(waiting, closed)):
            pass

    reader = asyncio.create_task(read())
    await asyncio.wait_for(waiting.wait(), scaled(10))
    reader.cancel()
    watch.end("session revoked; sign in again")
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert closed == [True]


async def test_a_relay_that_expires_between_items_ends_before_the_next() -> None:
    watch = CredentialWatch(_principal(expires_in_s=0.2))

    async def slow_reader_items() -> AsyncIterator[int]:
        for n in range(1000):
            yield n

    seen = []
    with pytest.raises(InvalidToken, match="expired"):
        async for item in watch.relay(slow_reader_items()):
            seen.append(item)
            await asyncio.sleep(0.05)  # the expiry fires while the reader is busy
    assert 1 <= len(seen) <= 20


async def test_subscription_ends_typed_when_the_token_expires(
    live_server: LiveServer, settings: Settings, engine: AsyncEngine
) -> None:
    token = await live_token(settings, engine, ttl_s=2)
    async with await open_socket(live_server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        await subscribe(ws, "subscription { heartbeat(intervalMs: 200) { seq } }")
        messages = []
        while True:
            message = await receive(ws, timeout=10)
            messages.append(message)
            if message["type"] in {"error", "complete"} or message["payload"].get("errors"):
                break
    ticks = [m for m in messages if m["type"] == "next" and m["payload"].get("data")]
    assert 3 <= len(ticks) <= 15
    last = messages[-1]
    errors = last["payload"] if last["type"] == "error" else last["payload"]["errors"]
    assert errors[0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert "expired" in errors[0]["message"]
