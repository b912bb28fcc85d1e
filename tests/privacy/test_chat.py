"""Chat and data protection on a live server: messages stored redacted, and the erasure of a
user whose turn is streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.agents.checkpoint import RedisCheckpointSaver
from backend.config import ChatSettings, GuardrailSettings, Settings
from backend.core.redis import KeySpace
from tests.agents.test_agent import events_of, text
from tests.agents.test_runs import PASSWORD, gql, sign_in, start_run
from tests.conftest import serve_asgi, serve_live
from tests.llm_stub import LLMStub

SENT = "my card is 4111 1111 1111 1111 and my mail is ada@example.com"
REDACTED = "my card is [CARD] and my mail is [EMAIL]"
SEND = """mutation($c: ID!, $m: String!) { sendMessage(conversationId: $c, content: $m) {
  run { id } message { content } } }"""
HISTORY = "query($c: ID!) { conversation(id: $c) { messages { edges { node { role content } } } } }"


async def _say(server: Any, token: str, conversation: str) -> tuple[str, list[dict]]:
    sent = await gql(server, token, SEND, c=conversation, m=SENT)
    assert "errors" not in sent, sent
    events = await events_of(server, token, sent["data"]["sendMessage"]["run"]["id"])
    return sent["data"]["sendMessage"]["message"]["content"], events


async def test_a_policy_stores_messages_as_the_model_gets_them(
    chat_settings: Settings,
    engine: AsyncEngine,
    team: dict[str, Any],
    llm: tuple[LLMStub, str],
) -> None:
    stub, _ = llm
    async with serve_live(chat_settings) as server:
        token = await sign_in(server, team)
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


@pytest.fixture
async def slow_llm() -> AsyncIterator[str]:
    stub = LLMStub(tokens_per_s=20, answer_tokens=2000)  # answers for minutes
    async with serve_asgi(stub.app) as port:
        yield f"http://127.0.0.1:{port}/v1"


async def test_erasing_a_user_stops_their_running_turn_and_leaves_nothing(
    settings: Settings,
    engine: AsyncEngine,
    team: dict[str, Any],
    slow_llm: str,
    redis: Redis,
    key_prefix: str,
) -> None:
    settings.chat = ChatSettings(llm_base_url=slow_llm, llm_model="echo", run_lease_s=1)
    settings.guardrails = GuardrailSettings(enabled=False)
    async with serve_live(settings) as server:
        admin = await sign_in(server, team)
        users = await gql(server, admin, "{ users { id email } }")
        member_id = next(u["id"] for u in users["data"]["users"] if u["email"] == "m@chat.example")
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            signed = await http.post(
                "/oauth/token",
                data={
                    "grant_type": "password",
                    "tenant": team["tenant"],
                    "username": "m@chat.example",
                    "password": PASSWORD,
                },
            )
        member = signed.json()["access_token"]
        conversation, run_id = await start_run(server, member, "a long story about my card")
        stream = f"{key_prefix}run:{{{run_id}}}:events"
        async with asyncio.timeout(60):  # the turn is streaming
            while await redis.xlen(stream) < 5:
                await asyncio.sleep(0.05)

        erased = await gql(
            server,
            admin,
            "mutation($id: ID!) { eraseUser(userId: $id) { status removed { runs messages } } }",
            id=member_id,
        )

        assert erased["data"]["eraseUser"]["status"] == "COMPLETED", erased
        assert erased["data"]["eraseUser"]["removed"]["runs"] == 1
        assert erased["data"]["eraseUser"]["removed"]["messages"] >= 1
        memory = RedisCheckpointSaver(redis, KeySpace(key_prefix).child("agent"))
        await asyncio.sleep(1)  # anything the stopped turn still had in flight has landed
        assert not await redis.exists(stream)
        assert await memory.aget_tuple({"configurable": {"thread_id": conversation}}) is None
        run = await gql(server, admin, "query($id: ID!) { run(id: $id) { id } }", id=run_id)
        assert run["errors"][0]["extensions"]["code"] == "NOT_FOUND"
