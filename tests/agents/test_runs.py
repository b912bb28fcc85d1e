"""Chat runs end to end: real uvicorn servers, real WebSockets, an OpenAI-compatible stub LLM,
real PostgreSQL and Redis. Accounts are committed (the servers have their own pools)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection

from backend.auth.passwords import hash_password
from backend.config import ChatSettings, LimitsSettings, Settings
from backend.core.db import Database
from backend.core.models import Message, Run, RunStatus, Tenant, User, UserRole
from tests.conftest import LiveServer, scaled, serve_asgi, serve_live
from tests.graphql.ws import init, open_socket, receive, subscribe
from tests.llm_stub import LLMStub

PASSWORD = "a good long password"


@pytest.fixture
async def llm() -> AsyncIterator[tuple[LLMStub, str]]:
    stub = LLMStub(tokens_per_s=200)
    async with serve_asgi(stub.app) as port:
        yield stub, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def chat_settings(settings: Settings, llm: tuple[LLMStub, str]) -> Settings:
    settings.chat = ChatSettings(
        llm_base_url=llm[1], llm_model="echo", run_lease_s=1, llm_retries=1
    )
    return settings


@pytest.fixture
async def server(chat_settings: Settings, engine: AsyncEngine) -> AsyncIterator[LiveServer]:
    async with serve_live(chat_settings) as live:
        yield live


@pytest.fixture
async def account(chat_settings: Settings, engine: AsyncEngine) -> dict[str, Any]:
    """A committed tenant and member (the live servers cannot see rolled-back rows)."""
    db = Database.connect(engine.url.render_as_string(hide_password=False), chat_settings.database)
    try:
        slug = f"chat-{secrets.token_hex(4)}"
        async with db.session() as session:
            tenant = Tenant(slug=slug, name="Chat")
            session.add(tenant)
        async with db.session(tenant.id) as session:
            session.add(
                User(
                    tenant_id=tenant.id,
                    email="u@chat.example",
                    role=UserRole.MEMBER,
                    password_hash=await hash_password(PASSWORD),
                )
            )
    finally:
        await db.dispose()
    return {"tenant": slug, "tenant_id": tenant.id}


async def sign_in(
    server: LiveServer, account: dict[str, Any], username: str = "u@chat.example"
) -> str:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.post(
            "/oauth/token",
            data={
                "grant_type": "password",
                "tenant": account["tenant"],
                "username": username,
                "password": PASSWORD,
            },
        )
    return response.json()["access_token"]


async def gql(server: LiveServer, token: str, query: str, **variables: Any) -> dict[str, Any]:
    # scaled: a first guardrailCheck loads the rails' models (over 5 s on a busy machine)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=scaled(30)) as http:
        response = await http.post(
            "/graphql",
            json={"query": query, "variables": variables},
            headers={"authorization": f"Bearer {token}"},
        )
    return response.json()


async def start_run(server: LiveServer, token: str, content: str) -> tuple[str, str]:
    created = await gql(server, token, 'mutation { createConversation(title: "t") { id } }')
    conversation = created["data"]["createConversation"]["id"]
    sent = await gql(
        server,
        token,
        "mutation($c: ID!, $m: String!) { sendMessage("
        "conversationId: $c, content: $m) { run { id status } message { role } } }",
        c=conversation,
        m=content,
    )
    assert "errors" not in sent, sent
    return conversation, sent["data"]["sendMessage"]["run"]["id"]


async def contents_of(server: LiveServer, token: str, conversation: str) -> list[str]:
    """The stored messages' contents, in order."""
    history = await gql(
        server,
        token,
        "query($c: ID!) { conversation(id: $c) { messages { edges { node { content } } } } }",
        c=conversation,
    )
    return [e["node"]["content"] for e in history["data"]["conversation"]["messages"]["edges"]]


EVENTS = """subscription($r: ID!, $a: String, $c: Boolean) {
  runEvents(runId: $r, after: $a, cancelOnDisconnect: $c) {
    __typename cursor
    ... on TokenDelta { text index }
    ... on RunCompleted { messageId usage { promptTokens completionTokens } }
    ... on RunFailed { code message }
  } }"""


async def collect(
    server: LiveServer,
    token: str,
    run_id: str,
    *,
    after: str | None = None,
    stop_after: int | None = None,
    cancel_on_disconnect: bool = False,
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with await open_socket(server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        await subscribe(ws, EVENTS, {"r": run_id, "a": after, "c": cancel_on_disconnect})
        while True:
            message = await receive(ws, timeout=scaled(60))
            if message["type"] == "complete":
                break
            assert message["type"] == "next", message
            assert "errors" not in message["payload"], message
            events.append(message["payload"]["data"]["runEvents"])
            if stop_after is not None and len(events) >= stop_after:
                break  # leaving the block disconnects
    return events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["__typename"] == "TokenDelta")


async def test_a_streamed_answer_is_persisted(server: LiveServer, account: dict[str, Any]) -> None:
    token = await sign_in(server, account)
    conversation, run_id = await start_run(server, token, "the quick brown fox")
    events = await collect(server, token, run_id)
    assert events[0]["__typename"] == "RunStarted"
    assert events[-1]["__typename"] == "RunCompleted"
    assert text_of(events) == "the quick brown fox "
    history = await gql(
        server,
        token,
        "query($c: ID!) { conversation(id: $c) { messages "
        "{ edges { node { role content complete } } } } }",
        c=conversation,
    )
    nodes = [e["node"] for e in history["data"]["conversation"]["messages"]["edges"]]
    assert nodes == [
        {"role": "USER", "content": "the quick brown fox", "complete": True},
        {"role": "ASSISTANT", "content": "the quick brown fox ", "complete": True},
    ]
    run = await gql(server, token, "query($r: ID!) { run(id: $r) { status } }", r=run_id)
    assert run["data"]["run"]["status"] == "COMPLETED"
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        metrics = (await http.get("/metrics")).text
    assert 'sightline_chat_runs_total{model="echo",outcome="completed",version="1"} 1.0' in metrics
    assert 'sightline_chat_tokens_total{model="echo",version="1"} 4.0' in metrics
    assert (
        'sightline_chat_time_to_first_token_seconds_count{model="echo",version="1"} 1.0' in metrics
    )
    assert "sightline_run_stream_lag_seconds_count" in metrics
    assert "sightline_chat_active_runs 0.0" in metrics
    assert 'sightline_chat_queue_wait_seconds_count{model="echo",version="1"} 1.0' in metrics
    assert "sightline_chat_queued_runs 0.0" in metrics
    assert (
        f'sightline_chat_cost_total{{model="echo",tenant="{account["tenant_id"]}",version="1"}}'
        in metrics
    )


async def test_the_first_answer_titles_an_untitled_conversation(
    server: LiveServer, account: dict[str, Any]
) -> None:
    token = await sign_in(server, account)
    title = "query($c: ID!) { conversation(id: $c) { title } }"
    send = (
        "mutation($c: ID!, $m: String!) "
        "{ sendMessage(conversationId: $c, content: $m) { run { id } } }"
    )
    created = await gql(server, token, "mutation { createConversation { id title } }")
    conversation = created["data"]["createConversation"]["id"]
    assert created["data"]["createConversation"]["title"] == ""
    for question in ("## How long do **refunds** take?\nFor orders abroad.", "And exchanges?"):
        sent = await gql(server, token, send, c=conversation, m=question)
        await collect(server, token, sent["data"]["sendMessage"]["run"]["id"])
        named = await gql(server, token, title, c=conversation)
        assert named["data"]["conversation"]["title"] == "How long do refunds take?"

    titled, run_id = await start_run(server, token, "a question")  # titled "t" by its creator
    await collect(server, token, run_id)
    kept = await gql(server, token, title, c=titled)
    assert kept["data"]["conversation"]["title"] == "t"


async def test_resume_after_disconnects_has_no_gap_or_duplicate(
    server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    llm[0].answer_tokens = 60
    token = await sign_in(server, account)
    _, run_id = await start_run(server, token, "one two three four five six")
    seen: list[dict[str, Any]] = []
    cursor = None
    for stop in (3, 5, 2, 7, None):  # drop the socket four times, then read to the end
        part = await collect(server, token, run_id, after=cursor, stop_after=stop)
        seen += part
        cursor = part[-1]["cursor"] if part else cursor
        if part and part[-1]["__typename"] == "RunCompleted":
            break
    deltas = [e for e in seen if e["__typename"] == "TokenDelta"]
    assert len(text_of(seen).split()) == 60
    indexes = [d["index"] for d in deltas]
    assert indexes == sorted(set(indexes))
    assert indexes[-1] == 59
    assert [e["__typename"] for e in seen].count("RunStarted") == 1


async def test_cancel_stops_the_model(
    server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    stub = llm[0]
    stub.answer_tokens = 10_000
    token = await sign_in(server, account)
    conversation, run_id = await start_run(server, token, "go on forever")
    async with await open_socket(server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        await subscribe(ws, EVENTS, {"r": run_id})
        while (await receive(ws))["payload"]["data"]["runEvents"]["__typename"] != "TokenDelta":
            pass
        cancelled = await gql(
            server, token, "mutation($r: ID!) { cancelRun(runId: $r) { status } }", r=run_id
        )
        assert "errors" not in cancelled
        while True:
            event = (await receive(ws))["payload"]["data"]["runEvents"]
            if event["__typename"] != "TokenDelta":
                break
    # Cancelled long before the 10,000-token answer (50 s at the stub's pace) could end.
    assert event["__typename"] == "RunCancelled"
    async with asyncio.timeout(scaled(30)):
        while stub.open_streams:  # the model's stream was closed, not left running
            await asyncio.sleep(0.01)
    history = await gql(
        server,
        token,
        "query($c: ID!) { conversation(id: $c) { messages { edges { node { role complete } } } } }",
        c=conversation,
    )
    last = history["data"]["conversation"]["messages"]["edges"][-1]["node"]
    assert last == {"role": "ASSISTANT", "complete": False}


async def test_double_texting_is_rejected(
    server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    llm[0].answer_tokens = 400
    token = await sign_in(server, account)
    conversation, run_id = await start_run(server, token, "long answer please")
    again = await gql(
        server,
        token,
        'mutation($c: ID!) { sendMessage(conversationId: $c, content: "again") { run { id } } }',
        c=conversation,
    )
    assert again["errors"][0]["extensions"]["code"] == "RUN_IN_PROGRESS"
    await gql(server, token, "mutation($r: ID!) { cancelRun(runId: $r) { id } }", r=run_id)


async def test_a_rejected_message_is_not_stored(
    server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    """REJECT refuses a message sent while a turn is going and stores nothing: no run would
    answer it, and the client, told RUN_IN_PROGRESS, keeps it to send again (storing it would
    leave an unanswered message in the history, and a second copy once sent again)."""
    llm[0].answer_tokens = 10_000
    token = await sign_in(server, account)
    conversation, run_id = await start_run(server, token, "long answer please")
    again = await gql(
        server,
        token,
        'mutation($c: ID!) { sendMessage(conversationId: $c, content: "again") { run { id } } }',
        c=conversation,
    )
    assert again["errors"][0]["extensions"]["code"] == "RUN_IN_PROGRESS"
    assert again["errors"][0]["extensions"]["runId"] == run_id
    contents = await contents_of(server, token, conversation)
    assert contents == ["long answer please"]
    # and the schema says so (it said "stored in every case")
    described = await gql(
        server,
        token,
        '{ __type(name: "Mutation") { fields { name description } } '
        'onBusy: __type(name: "OnBusy") { description } }',
    )
    fields = {f["name"]: f["description"] for f in described["data"]["__type"]["fields"]}
    assert "not stored" in fields["sendMessage"]
    assert "not stored" in described["data"]["onBusy"]["description"]
    await gql(server, token, "mutation($r: ID!) { cancelRun(runId: $r) { id } }", r=run_id)


@pytest.mark.parametrize(("wait_s", "answered"), [(scaled(60), "CANCELLED"), (0, "CANCELLING")])
async def test_cancel_run_answers_the_final_status_or_cancelling(
    chat_settings: Settings,
    engine: AsyncEngine,
    account: dict[str, Any],
    llm: tuple[LLMStub, str],
    wait_s: float,
    answered: str,
) -> None:
    """cancelRun answered RUNNING, which told the caller nothing: it now waits (up to
    cancel_wait_s) for the run's end, and says CANCELLING when it has not come yet."""
    llm[0].answer_tokens = 10_000
    chat_settings.chat = chat_settings.chat.model_copy(update={"cancel_wait_s": wait_s})
    async with serve_live(chat_settings) as server:
        token = await sign_in(server, account)
        _, run_id = await start_run(server, token, "go on forever")
        async with await open_socket(server.ws_url) as ws:  # the answer has begun
            await init(ws, {"authorization": f"Bearer {token}"})
            await subscribe(ws, EVENTS, {"r": run_id})
            while (await receive(ws))["payload"]["data"]["runEvents"]["__typename"] != (
                "TokenDelta"
            ):
                pass
        query = "mutation($r: ID!) { cancelRun(runId: $r) { status } }"
        cancelled = await gql(server, token, query, r=run_id)
        assert cancelled["data"]["cancelRun"]["status"] == answered
        events = await collect(server, token, run_id)
        assert events[-1]["__typename"] == "RunCancelled"
        run = await gql(server, token, "query($r: ID!) { run(id: $r) { status } }", r=run_id)
        assert run["data"]["run"]["status"] == "CANCELLED"
        # an ended run is answered as it is
        again = await gql(server, token, query, r=run_id)
        assert again["data"]["cancelRun"]["status"] == "CANCELLED"


async def test_bad_input_is_typed(server: LiveServer, account: dict[str, Any]) -> None:
    token = await sign_in(server, account)
    created = await gql(server, token, "mutation { createConversation { id } }")
    conversation = created["data"]["createConversation"]["id"]
    for content, code in (("   ", "BAD_USER_INPUT"), ("x" * 40_000, "BAD_USER_INPUT")):
        body = await gql(
            server,
            token,
            "mutation($c: ID!, $m: String!) { sendMessage("
            "conversationId: $c, content: $m) { run { id } } }",
            c=conversation,
            m=content,
        )
        assert body["errors"][0]["extensions"]["code"] == code
    body = await gql(
        server,
        token,
        'mutation($c: ID!) { sendMessage(conversationId: $c, content: "hi") { run { id } } }',
        c=str(uuid.uuid4()),
    )
    assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    _, run_id = await start_run(server, token, "hello")
    await collect(server, token, run_id)
    async with await open_socket(server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        await subscribe(ws, EVENTS, {"r": run_id, "a": "garbage"})
        message = await receive(ws)
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_llm_failure_ends_the_run_with_a_typed_event(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    chat_settings.chat = chat_settings.chat.model_copy(update={"llm_model": "fail-99"})
    async with serve_live(chat_settings) as server:
        token = await sign_in(server, account)
        _, run_id = await start_run(server, token, "hello")
        events = await collect(server, token, run_id)
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            metrics = (await http.get("/metrics")).text
    assert events[-1]["__typename"] == "RunFailed"
    assert events[-1]["code"] == "LLM_UNAVAILABLE"
    [failed] = [line for line in metrics.splitlines() if 'surface="chat_run"' in line]
    assert 'code="LLM_UNAVAILABLE"' in failed
    assert 'operation="chatRun"' in failed
    assert failed.endswith(" 1.0")


CHAT = """subscription($c: ID!, $m: String!, $d: Boolean! = false) {
  chat(conversationId: $c, content: $m, cancelOnDisconnect: $d) {
    __typename cursor
    ... on RunStarted { runId conversationId model }
    ... on TokenDelta { text index }
    ... on RunCompleted { messageId }
    ... on RunCancelled { messageId }
  } }"""


async def chat_events(
    ws: ClientConnection, conversation: str, content: str, op_id: str = "1"
) -> list[dict[str, Any]]:
    """One `chat` operation on an open socket, read to its end (its errors raise)."""
    await subscribe(ws, CHAT, {"c": conversation, "m": content}, op_id)
    events = []
    while (message := await receive(ws, timeout=scaled(60)))["type"] == "next":
        assert "errors" not in message["payload"], message
        events.append(message["payload"]["data"]["chat"])
    assert message["type"] == "complete", message
    return events


async def test_chat_sends_a_message_and_streams_its_answer_in_one_operation(
    server: LiveServer, account: dict[str, Any]
) -> None:
    """`chat` is sendMessage and runEvents in one operation: RunStarted names the run, the
    answer streams and is persisted, and two turns run one after the other on one socket."""
    token = await sign_in(server, account)
    created = await gql(server, token, 'mutation { createConversation(title: "t") { id } }')
    conversation = created["data"]["createConversation"]["id"]
    async with await open_socket(server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        first = await chat_events(ws, conversation, "the quick brown fox")
        second = await chat_events(ws, conversation, "jumps over", op_id="2")
    started = first[0]
    assert started["__typename"] == "RunStarted"
    assert started["conversationId"] == conversation
    assert first[-1]["__typename"] == second[-1]["__typename"] == "RunCompleted"
    assert text_of(first) == "the quick brown fox "
    replayed = await collect(server, token, started["runId"])  # the same run's events
    assert (replayed[0]["cursor"], replayed[-1]["cursor"]) == (
        first[0]["cursor"],
        first[-1]["cursor"],
    )
    assert text_of(replayed) == text_of(first)
    run = await gql(server, token, "query($r: ID!) { run(id: $r) { status } }", r=started["runId"])
    assert run["data"]["run"]["status"] == "COMPLETED"
    history = await gql(
        server,
        token,
        "query($c: ID!) { conversation(id: $c) { messages { edges { node { role content } } } } }",
        c=conversation,
    )
    nodes = [e["node"] for e in history["data"]["conversation"]["messages"]["edges"]]
    assert [n["role"] for n in nodes] == ["USER", "ASSISTANT", "USER", "ASSISTANT"]
    assert nodes[2]["content"] == "jumps over"


async def test_chat_refuses_as_send_message_does(
    server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    """Another's (or no) conversation: NOT_FOUND; a second message while a turn is going:
    RUN_IN_PROGRESS, and nothing stored for it; a disconnect with cancelOnDisconnect stops
    the run."""
    llm[0].answer_tokens = 2_000  # 10 s at the stub's rate: still running when asked
    token = await sign_in(server, account)
    created = await gql(server, token, 'mutation { createConversation(title: "t") { id } }')
    conversation = created["data"]["createConversation"]["id"]

    async def refused(conversation_id: str) -> str:
        async with await open_socket(server.ws_url) as ws:
            await init(ws, {"authorization": f"Bearer {token}"})
            await subscribe(ws, CHAT, {"c": conversation_id, "m": "hello"})
            message = await receive(ws, timeout=scaled(30))
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        return errors[0]["extensions"]["code"]

    assert await refused(str(uuid.uuid4())) == "NOT_FOUND"
    async with await open_socket(server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {token}"})
        await subscribe(ws, CHAT, {"c": conversation, "m": "a long answer", "d": True})
        started = (await receive(ws, timeout=scaled(30)))["payload"]["data"]["chat"]
        assert started["__typename"] == "RunStarted"
        assert await refused(conversation) == "RUN_IN_PROGRESS"
    async with asyncio.timeout(scaled(30)):  # the socket closed: the run is stopped
        while True:
            run = await gql(
                server, token, "query($r: ID!) { run(id: $r) { status } }", r=started["runId"]
            )
            if run["data"]["run"]["status"] == "CANCELLED":
                break
            await asyncio.sleep(0.1)
    contents = await contents_of(server, token, conversation)
    assert "hello" not in contents


async def test_a_run_is_streamed_from_another_replica(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    llm[0].answer_tokens = 40
    async with serve_live(chat_settings) as first, serve_live(chat_settings) as second:
        token = await sign_in(first, account)
        _, run_id = await start_run(first, token, "replicated words")
        events = await collect(second, token, run_id)  # started on one, read from the other
    assert events[-1]["__typename"] == "RunCompleted"
    assert len(text_of(events).split()) == 40


async def test_a_message_to_a_conversation_deleted_on_another_replica_is_not_found(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any]
) -> None:
    """A replica takes a conversation it created as the caller's without a query; the turn's
    statement, under the conversation's lock, is what finds it gone: NOT_FOUND, nothing
    stored, nothing held (the caller's next run starts at once)."""
    send = 'mutation($c: ID!) { sendMessage(conversationId: $c, content: "hi") { run { id } } }'
    async with serve_live(chat_settings) as first, serve_live(chat_settings) as second:
        token = await sign_in(first, account)
        created = await gql(first, token, 'mutation { createConversation(title: "t") { id } }')
        conversation = created["data"]["createConversation"]["id"]
        deleted = await gql(
            second, token, "mutation($c: ID!) { deleteConversation(id: $c) }", c=conversation
        )
        assert deleted["data"]["deleteConversation"] is True, deleted
        for _ in range(2):  # the second one is refused by the replica's check alone
            body = await gql(first, token, send, c=conversation)
            assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND", body
        async with engine.connect() as conn:
            stored = await conn.scalar(
                text("SELECT count(*) FROM runs WHERE conversation_id = :c"), {"c": conversation}
            )
        assert stored == 0
        _, run_id = await start_run(first, token, "hello")  # the refused ones held nothing
        await collect(first, token, run_id)


async def test_a_run_whose_replica_died_fails_with_worker_lost(
    server: LiveServer, account: dict[str, Any], chat_settings: Settings, engine: AsyncEngine
) -> None:
    """A run row left RUNNING with a lease nobody renews (its replica was killed)."""
    token = await sign_in(server, account)
    created = await gql(server, token, "mutation { createConversation { id } }")
    conversation = uuid.UUID(created["data"]["createConversation"]["id"])
    db = Database.connect(engine.url.render_as_string(hide_password=False), chat_settings.database)
    try:
        async with db.session(account["tenant_id"]) as session:
            user = await session.scalar(select(User.id))
            run = Run(
                tenant_id=account["tenant_id"],
                conversation_id=conversation,
                user_id=user,
                status=RunStatus.RUNNING,
                model="echo",
            )
            session.add(run)
        from redis.asyncio import Redis

        from backend.core.redis import KeySpace
        from backend.realtime.eventlog import RunEventLog

        redis = Redis.from_url(str(chat_settings.redis.url.get_secret_value()))  # type: ignore[union-attr]
        keys = KeySpace(chat_settings.redis.key_prefix)
        await RunEventLog(redis, keys).append(str(run.id), "RunStarted", {"model": "echo"})
        await redis.zadd(
            keys.child("runs")("leases"),
            {f"{account['tenant_id']}:{run.id}:{user}": time.time() - 1},
        )
        await redis.aclose()
        events = await collect(server, token, str(run.id))
        assert events[-1]["__typename"] == "RunFailed"
        assert events[-1]["code"] == "WORKER_LOST"
        async with db.session(account["tenant_id"]) as session:
            row = await session.get(Run, run.id)
            assert row is not None
            assert row.status is RunStatus.FAILED
            assert row.error_code == "WORKER_LOST"
            assert await session.scalar(select(Message.id).where(Message.run_id == run.id)) is None
    finally:
        await db.dispose()


async def test_cancel_still_reaches_runs_after_the_server_sat_idle(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    """Idle longer than the Redis socket timeout: the cancel listener must still be there."""
    llm[0].answer_tokens = 5_000
    chat_settings.redis.socket_timeout_s = 0.5
    async with serve_live(chat_settings) as server:
        await asyncio.sleep(1.5)
        token = await sign_in(server, account)
        _, run_id = await start_run(server, token, "keep going")
        await asyncio.sleep(0.3)
        await gql(server, token, "mutation($r: ID!) { cancelRun(runId: $r) { id } }", r=run_id)
        events = await collect(server, token, run_id)
    assert events[-1]["__typename"] == "RunCancelled"


async def test_a_cancel_flag_without_its_message_still_stops_the_run(
    server: LiveServer, account: dict[str, Any], chat_settings: Settings, llm: tuple[LLMStub, str]
) -> None:
    """The flag is what counts: a cancel whose pub/sub message never arrived (the listener was
    reconnecting, say) is read by the replica's sweep."""
    from redis.asyncio import Redis

    from backend.core.redis import KeySpace

    llm[0].answer_tokens = 5_000
    token = await sign_in(server, account)
    _, run_id = await start_run(server, token, "keep going")
    redis = Redis.from_url(str(chat_settings.redis.url.get_secret_value()))  # type: ignore[union-attr]
    try:
        await asyncio.sleep(0.3)
        await redis.set(KeySpace(chat_settings.redis.key_prefix).child("runs")("cancel", run_id), 1)
        events = await collect(server, token, run_id)
    finally:
        await redis.aclose()
    # Cancelled, not completed: the 5,000-token answer would take the stub 25 s.
    assert events[-1]["__typename"] == "RunCancelled"


async def test_the_sweep_that_sleeps_while_no_run_executes_wakes_for_the_next_one(
    chat_settings: Settings, engine: AsyncEngine, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    """With no run here the cancel sweep waits for one instead of ticking: after an idle
    spell, and again after a run has ended, a cancel flag alone still stops a run."""
    from redis.asyncio import Redis

    from backend.core.redis import KeySpace

    cancels = KeySpace(chat_settings.redis.key_prefix).child("runs")
    redis = Redis.from_url(str(chat_settings.redis.url.get_secret_value()))  # type: ignore[union-attr]
    try:
        async with serve_live(chat_settings) as server:
            token = await sign_in(server, account)
            ended = []
            for _ in range(2):
                await asyncio.sleep(0.6)  # idle: no run executes on this replica
                llm[0].answer_tokens = 5_000
                _, run_id = await start_run(server, token, "keep going")
                await asyncio.sleep(0.3)
                await redis.set(cancels("cancel", run_id), 1)
                ended.append((await collect(server, token, run_id))[-1]["__typename"])
    finally:
        await redis.aclose()
    assert ended == ["RunCancelled", "RunCancelled"]


async def test_double_texting_interrupt_and_enqueue(
    server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    llm[0].answer_tokens = 300  # 1.5 s per answer at the stub's 200 tokens/s
    token = await sign_in(server, account)
    conversation, first = await start_run(server, token, "first question")
    send = (
        "mutation($c: ID!, $m: String!, $b: OnBusy!) { sendMessage(conversationId: $c, "
        "content: $m, onBusy: $b) { run { id } } }"
    )

    await collect(server, token, first, stop_after=2)  # it is answering (a token arrived)
    interrupting = await gql(server, token, send, c=conversation, m="actually, this", b="INTERRUPT")
    second = interrupting["data"]["sendMessage"]["run"]["id"]
    assert (await collect(server, token, first))[-1]["__typename"] == "RunCancelled"

    queued = await gql(server, token, send, c=conversation, m="and then this", b="ENQUEUE")
    third = queued["data"]["sendMessage"]["run"]["id"]
    second_events = await collect(server, token, second)
    third_events = await collect(server, token, third)
    assert second_events[-1]["__typename"] == "RunCompleted"
    assert third_events[-1]["__typename"] == "RunCompleted"
    history = await gql(
        server,
        token,
        "query($c: ID!) { conversation(id: $c) { messages "
        "{ edges { node { role content complete } } } } }",
        c=conversation,
    )
    nodes = [e["node"] for e in history["data"]["conversation"]["messages"]["edges"]]
    users = [n["content"] for n in nodes if n["role"] == "USER"]
    assert users == ["first question", "actually, this", "and then this"]  # nothing lost
    assistants = [n["complete"] for n in nodes if n["role"] == "ASSISTANT"]
    assert assistants == [False, True, True]  # the interrupted answer is kept, marked


@pytest.fixture
async def unlimited_server(
    chat_settings: Settings, engine: AsyncEngine
) -> AsyncIterator[LiveServer]:
    """A server whose rate limits never refuse (a property test starts many runs)."""
    chat_settings.limits = LimitsSettings(enabled=False)
    async with serve_live(chat_settings) as live:
        yield live


CUTS = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=6)


async def _disconnect_and_resume(
    server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str], cuts: list[int]
) -> None:
    """Property: whatever points a client drops its socket at, resuming from its last cursor
    (on a new socket) yields every token exactly once, in order."""
    llm[0].answer_tokens = 40
    token = await sign_in(server, account)
    _, run_id = await start_run(server, token, "alpha beta gamma delta")
    seen: list[dict[str, Any]] = []
    cursor = None
    for stop in [*cuts, None]:
        part = await collect(server, token, run_id, after=cursor, stop_after=stop)
        seen += part
        cursor = part[-1]["cursor"] if part else cursor
        if part and part[-1]["__typename"] == "RunCompleted":
            break
    else:
        seen += await collect(server, token, run_id, after=cursor)
    indexes = [e["index"] for e in seen if e["__typename"] == "TokenDelta"]
    assert indexes == sorted(set(indexes))  # no duplicate, in order
    assert len(text_of(seen).split()) == 40  # no gap (deltas may arrive merged)
    assert seen[-1]["__typename"] == "RunCompleted"


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=CUTS)
async def test_random_disconnects_over_the_websocket_lose_and_repeat_nothing(
    unlimited_server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str], cuts: list[int]
) -> None:
    await _disconnect_and_resume(unlimited_server, account, llm, cuts)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=CUTS)
async def test_random_disconnects_under_cpu_load_lose_and_repeat_nothing(
    cpu_load: None,
    unlimited_server: LiveServer,
    account: dict[str, Any],
    llm: tuple[LLMStub, str],
    cuts: list[int],
) -> None:
    # The gap this found (a resumed reader behind an earlier subscriber of the same stream)
    # showed only on a loaded machine, where the old socket's cleanup comes late.
    await _disconnect_and_resume(unlimited_server, account, llm, cuts)


@pytest.fixture
async def batching_server(
    chat_settings: Settings, engine: AsyncEngine
) -> AsyncIterator[LiveServer]:
    """A server that batches tokens from its first run (as a busy one does)."""
    chat_settings.chat = chat_settings.chat.model_copy(
        update={"stream_batch_min_runs": 1, "stream_batch_ms": 60.0}
    )
    async with serve_live(chat_settings) as live:
        yield live


async def test_a_busy_replica_batches_tokens_and_cursors_stay_exact(
    batching_server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    llm[0].answer_tokens = 40  # 5 ms apart: many fall within one 60 ms batch
    token = await sign_in(batching_server, account)
    conversation, run_id = await start_run(batching_server, token, "count")
    whole = await collect(batching_server, token, run_id)
    deltas = [e for e in whole if e["__typename"] == "TokenDelta"]
    assert len(text_of(whole).split()) == 40
    assert len(deltas) < 40  # batched: fewer events than tokens
    indexes = [d["index"] for d in deltas]
    assert indexes == sorted(set(indexes))
    assert indexes[-1] == 39  # `index`: the batch's last token's
    assert whole[-1]["__typename"] == "RunCompleted"
    for middle in (0, len(deltas) // 2, len(deltas) - 1):  # resuming after any batch
        rest = await collect(batching_server, token, run_id, after=deltas[middle]["cursor"])
        assert text_of(whole[: whole.index(deltas[middle]) + 1]) + text_of(rest) == text_of(whole)
        assert rest[-1]["__typename"] == "RunCompleted"
    history = await gql(
        batching_server,
        token,
        "query($c: ID!) { conversation(id: $c) { messages { edges { node { content } } } } }",
        c=conversation,
    )
    assert history["data"]["conversation"]["messages"]["edges"][-1]["node"] == {
        "content": text_of(whole)
    }


async def test_a_cancelled_batching_run_logs_every_piece_before_its_end(
    batching_server: LiveServer, account: dict[str, Any], llm: tuple[LLMStub, str]
) -> None:
    llm[0].answer_tokens = 10_000
    token = await sign_in(batching_server, account)
    conversation, run_id = await start_run(batching_server, token, "go on")
    events = await collect(batching_server, token, run_id, stop_after=4)
    cancelled = await gql(
        batching_server, token, "mutation($r: ID!) { cancelRun(runId: $r) { status } }", r=run_id
    )
    assert "errors" not in cancelled
    events += await collect(batching_server, token, run_id, after=events[-1]["cursor"])
    assert events[-1]["__typename"] == "RunCancelled"
    history = await gql(
        batching_server,
        token,
        "query($c: ID!) { conversation(id: $c) { messages { edges { node { content } } } } }",
        c=conversation,
    )
    stored = history["data"]["conversation"]["messages"]["edges"][-1]["node"]["content"]
    assert text_of(events) == stored  # pieces still batched at the cancel were logged too


async def test_only_the_runs_owner_reads_its_events_while_it_runs_here(
    server: LiveServer,
    account: dict[str, Any],
    llm: tuple[LLMStub, str],
    engine: AsyncEngine,
    chat_settings: Settings,
) -> None:
    """A run executing on this replica is authorised from memory: another member of the
    tenant gets NOT_FOUND for it, as for any run that is not theirs."""
    llm[0].answer_tokens = 2_000  # 10 s at the stub's rate: still running when asked
    url = engine.url.render_as_string(hide_password=False)
    db = Database.connect(url, chat_settings.database)
    try:
        async with db.session(account["tenant_id"]) as session:
            session.add(
                User(
                    tenant_id=account["tenant_id"],
                    email="v@chat.example",
                    role=UserRole.MEMBER,
                    password_hash=await hash_password(PASSWORD),
                )
            )
    finally:
        await db.dispose()
    owner = await sign_in(server, account)
    other = await sign_in(server, account, "v@chat.example")
    _, run_id = await start_run(server, owner, "a long answer")
    assert uuid.UUID(run_id) in server.services.runs._owners  # executing here
    async with await open_socket(server.ws_url) as ws:
        await init(ws, {"authorization": f"Bearer {other}"})
        await subscribe(ws, EVENTS, {"r": run_id, "a": None, "c": False})
        message = await receive(ws, timeout=scaled(30))
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "NOT_FOUND"
    first = await collect(server, owner, run_id, stop_after=3)
    assert [e["__typename"] for e in first][-1] == "TokenDelta"
    cancelled = await gql(
        server, owner, "mutation($r: ID!) { cancelRun(runId: $r) { id } }", r=run_id
    )
    assert "errors" not in cancelled, cancelled
