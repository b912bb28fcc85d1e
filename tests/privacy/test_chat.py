"""Messages stored redacted, in a real chat: a live server on its default rails, the LLM stub."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.auth.passwords import hash_password
from backend.config import Settings
from backend.core.db import Database
from backend.core.models import Tenant, User, UserRole
from tests.agents.test_agent import events_of, text
from tests.agents.test_runs import PASSWORD, gql, sign_in
from tests.conftest import serve_live
from tests.llm_stub import LLMStub

SENT = "my card is 4111 1111 1111 1111 and my mail is ada@example.com"
REDACTED = "my card is [CARD] and my mail is [EMAIL]"
SEND = """mutation($c: ID!, $m: String!) { sendMessage(conversationId: $c, content: $m) {
  run { id } message { content } } }"""
HISTORY = "query($c: ID!) { conversation(id: $c) { messages { edges { node { role content } } } } }"


@pytest.fixture
async def admin_account(chat_settings: Settings, engine: AsyncEngine) -> dict[str, Any]:
    """A committed tenant whose u@chat.example is an admin (the live server has its own pool)."""
    db = Database.connect(engine.url.render_as_string(hide_password=False), chat_settings.database)
    try:
        async with db.session() as session:
            tenant = Tenant(slug=f"priv-{secrets.token_hex(4)}", name="Privacy")
            session.add(tenant)
        async with db.session(tenant.id) as session:
            session.add(
                User(
                    tenant_id=tenant.id,
                    email="u@chat.example",
                    role=UserRole.ADMIN,
                    password_hash=await hash_password(PASSWORD),
                )
            )
    finally:
        await db.dispose()
    return {"tenant": tenant.slug, "tenant_id": tenant.id}


async def _say(server: Any, token: str, conversation: str) -> tuple[str, list[dict]]:
    sent = await gql(server, token, SEND, c=conversation, m=SENT)
    assert "errors" not in sent, sent
    events = await events_of(server, token, sent["data"]["sendMessage"]["run"]["id"])
    return sent["data"]["sendMessage"]["message"]["content"], events


async def test_a_policy_stores_messages_as_the_model_gets_them(
    chat_settings: Settings,
    engine: AsyncEngine,
    admin_account: dict[str, Any],
    llm: tuple[LLMStub, str],
) -> None:
    stub, _ = llm
    async with serve_live(chat_settings) as server:
        token = await sign_in(server, admin_account)
        created = await gql(server, token, 'mutation { createConversation(title: "t") { id } }')
        conversation = created["data"]["createConversation"]["id"]

        # by default the model gets it redacted (the PII rail) but it is stored as sent
        stored, _ = await _say(server, token, conversation)
        assert stored == SENT
        assert stub.requests[-1]["messages"][-1]["content"] == REDACTED

        changed = await gql(
            server,
            token,
            "mutation { updatePrivacyPolicy(storeMessagesRedacted: true) "
            "{ storeMessagesRedacted } }",
        )
        assert changed["data"]["updatePrivacyPolicy"]["storeMessagesRedacted"] is True
        stored, events = await _say(server, token, conversation)
        assert stored == REDACTED
        assert stub.requests[-1]["messages"][-1]["content"] == REDACTED
        assert "4111" not in text(events)  # the echo of a redacted message
        history = await gql(server, token, HISTORY, c=conversation)
        edges = history["data"]["conversation"]["messages"]["edges"]
        users = [e["node"]["content"] for e in edges if e["node"]["role"] == "USER"]
        assert users == [SENT, REDACTED]
        async with asyncio.timeout(30):  # decisions are audited in batches, in the background
            while not (
                await gql(server, token, '{ auditEvents(event: "guardrails.storage.pii") { id } }')
            )["data"]["auditEvents"]:
                await asyncio.sleep(0.1)
