"""Runs whose replica died: what a killed replica leaves in Redis and PostgreSQL is made here
by hand (tests/faults kills real server processes), and a live server must recover it: the
partial answer kept, the user never locked out, the reservation given back."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import select

from backend.config import ChatSettings, LimitsSettings, Settings
from backend.core.db import Database
from backend.core.models import Message, MessageRole, Run, RunStatus, UsageRecord, User
from backend.core.redis import KeySpace
from backend.limits.budgets import Budgets, Resource
from backend.realtime.eventlog import RunEventLog
from tests.agents.test_runs import (
    account,
    collect,
    gql,
    llm,
    server,
    sign_in,
    start_run,
    text_of,
)
from tests.conftest import LiveServer, serve_live
from tests.knowledge.test_service import database
from tests.llm_stub import LLMStub

__all__ = ["account", "database", "llm", "server"]  # fixtures (chat_settings is this module's)


@pytest.fixture
def chat_settings(settings: Settings, llm: tuple[LLMStub, str]) -> Settings:
    settings.chat = ChatSettings(
        llm_base_url=llm[1],
        llm_model="echo",
        run_lease_s=1,
        run_lost_grace_s=1,
        llm_retries=1,
        max_active_runs_per_user=1,  # one lost run left behind would lock the user out
    )
    settings.limits = LimitsSettings()  # budgets on: a lost run's hold must come back
    return settings


async def leave_a_dead_run(
    database: Database,
    redis: Redis,
    settings: Settings,
    account: dict[str, Any],
    conversation: uuid.UUID,
    streamed: list[str],
    **columns: Any,
) -> tuple[Run, uuid.UUID]:
    """What a replica killed mid-answer leaves: the row RUNNING, the user's message, the
    tokens in the run's log, the run in its user's active runs, a held reservation, and a
    lease nobody renews."""
    keys = KeySpace(settings.redis.key_prefix)
    async with database.session(account["tenant_id"]) as session:
        user = await session.scalar(select(User.id))
        assert user is not None
        run = Run(
            tenant_id=account["tenant_id"],
            conversation_id=conversation,
            user_id=user,
            status=RunStatus.RUNNING,
            model="echo",
            **columns,
        )
        session.add(run)
        await session.flush()
        session.add(
            Message(
                tenant_id=account["tenant_id"],
                conversation_id=conversation,
                seq=1,
                role=MessageRole.USER,
                content="tell me everything",
                author_id=user,
                run_id=run.id,
            )
        )
    log = RunEventLog(redis, keys)
    await log.append(str(run.id), "RunStarted", {"model": "echo"})
    for index, piece in enumerate(streamed):
        await log.append(str(run.id), "TokenDelta", {"text": piece, "index": index})
    await log.close()
    budgets = Budgets(redis, keys, settings.limits)
    reservation = await budgets.reserve(
        tenant_id=account["tenant_id"],
        user_id=user,
        plan="free",
        resource=Resource.LLM_TOKENS,
        amount=settings.chat.max_tokens,
        subject=f"run:{run.id}",
        hold_id=str(run.id),
    )
    money = await budgets.admit(
        tenant_id=account["tenant_id"],
        user_id=user,
        plan="free",
        subject=f"run:{run.id}",
        hold_id=str(run.id),
    )
    await budgets.charge_together([(reservation, 2), (money, 0.004)])  # as it streamed
    runs = keys.child("runs")
    await redis.sadd(runs("active", str(user)), str(run.id))
    await redis.zadd(runs("leases"), {f"{account['tenant_id']}:{run.id}:{user}": time.time() - 1})
    return run, user


async def held(redis: Redis, settings: Settings, tenant: uuid.UUID, user: uuid.UUID) -> float:
    budgets = Budgets(redis, KeySpace(settings.redis.key_prefix), settings.limits)
    keys = budgets._counter_keys(tenant, user, Resource.LLM_TOKENS)
    values = await redis.mget(keys[4:])
    return sum(float(v or 0) for v in values)


async def test_a_lost_run_keeps_its_partial_answer_and_frees_its_user(
    server: LiveServer,
    account: dict[str, Any],
    chat_settings: Settings,
    database: Database,
    redis: Redis,
) -> None:
    token = await sign_in(server, account)
    created = await gql(server, token, "mutation { createConversation { id } }")
    conversation = uuid.UUID(created["data"]["createConversation"]["id"])
    streamed = ["Once ", "upon ", "a ", "time"]
    run, user = await leave_a_dead_run(
        database, redis, chat_settings, account, conversation, streamed
    )
    assert await held(redis, chat_settings, account["tenant_id"], user) > 0

    events = await collect(server, token, str(run.id))  # a subscriber is not left hanging
    assert text_of(events) == "Once upon a time"
    assert events[-1]["__typename"] == "RunFailed"
    assert events[-1]["code"] == "WORKER_LOST"
    async with database.session(account["tenant_id"]) as session:
        row = await session.get(Run, run.id)
        assert row is not None
        assert (row.status, row.error_code) == (RunStatus.FAILED, "WORKER_LOST")
        answer = await session.scalar(
            select(Message).where(Message.run_id == run.id, Message.role == MessageRole.ASSISTANT)
        )
        assert answer is not None
        assert (answer.content, answer.complete) == ("Once upon a time", False)
        assert row.message_id == answer.id
        usage = await session.scalar(
            select(UsageRecord.amount).where(UsageRecord.subject == f"run:{run.id}")
        )
        assert usage == 4  # the four pieces delivered: charged, and recorded once
    assert await held(redis, chat_settings, account["tenant_id"], user) == 0

    # The user is not locked out (one active run allowed): the same conversation goes on.
    sent = await gql(
        server,
        token,
        'mutation($c: ID!) { sendMessage(conversationId: $c, content: "and then") { run { id } } }',
        c=str(conversation),
    )
    assert "errors" not in sent, sent
    after = await collect(server, token, sent["data"]["sendMessage"]["run"]["id"])
    assert after[-1]["__typename"] == "RunCompleted"


async def test_active_runs_left_without_a_lease_lock_nobody_out(
    server: LiveServer, account: dict[str, Any], chat_settings: Settings, redis: Redis
) -> None:
    """What an earlier version left behind (active entries no lease backs) heals on use."""
    token = await sign_in(server, account)
    me = await gql(server, token, "{ me { userId } }")
    user = me["data"]["me"]["userId"]
    runs = KeySpace(chat_settings.redis.key_prefix).child("runs")
    await redis.sadd(runs("active", user), str(uuid.uuid4()))
    _, run_id = await start_run(server, token, "still welcome")
    events = await collect(server, token, run_id)
    assert events[-1]["__typename"] == "RunCompleted"


async def test_a_lost_run_is_charged_the_money_its_replica_had_not(
    account: dict[str, Any],
    chat_settings: Settings,
    database: Database,
    redis: Redis,
) -> None:
    """The replica charged 2 tokens' money (0.004) before it died; the run's money record
    says so, and the replica that ends the run charges the rest of its cost (its prompt and
    the 4 pieces delivered) once, then drops the record."""
    chat_settings.chat = chat_settings.chat.model_copy(
        update={"prompt_price_per_1k": 1.0, "completion_price_per_1k": 2.0}
    )
    async with serve_live(chat_settings) as server:
        token = await sign_in(server, account)
        created = await gql(server, token, "mutation { createConversation { id } }")
        conversation = uuid.UUID(created["data"]["createConversation"]["id"])
        run, user = await leave_a_dead_run(
            database,
            redis,
            chat_settings,
            account,
            conversation,
            ["Once ", "upon ", "a ", "time"],
            model_alias="default",
            model_version="1",
            prompt_tokens=10,
        )
        events = await collect(server, token, str(run.id))
    assert events[-1]["code"] == "WORKER_LOST"
    budgets = Budgets(redis, KeySpace(chat_settings.redis.key_prefix), chat_settings.limits)
    counters = budgets._counter_keys(account["tenant_id"], user, Resource.COST)
    cost = 10 / 1000 * 1.0 + 4 / 1000 * 2.0
    assert [float(v) for v in await redis.mget(counters[:4])] == [pytest.approx(cost)] * 4
    record = budgets._record_key(account["tenant_id"], Resource.COST, str(run.id))
    assert not await redis.exists(record)


async def test_a_send_refused_at_the_users_limit_of_runs_leaves_nothing_held(
    server: LiveServer,
    account: dict[str, Any],
    chat_settings: Settings,
    redis: Redis,
    llm: tuple[LLMStub, str],
) -> None:
    """A turn's admission (its lease, its place among the user's active runs, its tokens held,
    its money admitted) is one pipeline: a send refused there gives all of it back."""
    llm[0].answer_tokens = 10_000
    token = await sign_in(server, account)
    me = await gql(server, token, "{ me { userId } }")
    user = me["data"]["me"]["userId"]
    _, going = await start_run(server, token, "go on")
    holding = await held(redis, chat_settings, account["tenant_id"], uuid.UUID(user))
    assert holding == 4 * chat_settings.chat.max_tokens  # each of the four counters
    created = await gql(server, token, 'mutation { createConversation(title: "t") { id } }')
    refused = await gql(
        server,
        token,
        'mutation($c: ID!) { sendMessage(conversationId: $c, content: "me too") { run { id } } }',
        c=created["data"]["createConversation"]["id"],
    )
    assert refused["errors"][0]["extensions"]["code"] == "RUN_IN_PROGRESS"
    assert await held(redis, chat_settings, account["tenant_id"], uuid.UUID(user)) == holding
    runs = KeySpace(chat_settings.redis.key_prefix).child("runs")
    assert {m.decode() for m in await redis.smembers(runs("active", user))} == {going}
    leases = [m.decode() for m in await redis.zrange(runs("leases"), 0, -1)]
    assert [lease.split(":")[1] for lease in leases] == [going]
    records = [
        k.decode()
        async for k in redis.scan_iter(match=f"{chat_settings.redis.key_prefix}budget:*:hold:*")
    ]
    assert len(records) == 2
    assert all(record.endswith(going) for record in records)
    await gql(server, token, "mutation($r: ID!) { cancelRun(runId: $r) { id } }", r=going)
