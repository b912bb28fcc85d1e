"""A PrivacyService on the test's transaction and Redis prefix, and a tenant with data to purge,
erase and export: every kind of row and Redis key the service must find."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.agents.checkpoint import RedisCheckpointSaver
from backend.app import build_signer
from backend.auth.audit import Outcome, record
from backend.auth.errors import InvalidGrant
from backend.auth.service import AuthService
from backend.config import PrivacySettings, Settings
from backend.core.db import Database
from backend.core.models import (
    Chunk,
    Conversation,
    Document,
    IngestionJob,
    Message,
    MessageRole,
    Run,
    RunStatus,
    Tenant,
    UsageRecord,
    User,
    UserRole,
    VisionJob,
)
from backend.core.redis import KeySpace
from backend.knowledge.service import _count_lexemes
from backend.privacy.service import PrivacyService, Streams
from backend.realtime.eventlog import RunEventLog
from tests.accounts import PASSWORD
from tests.agents.test_runs import account, chat_settings, llm  # noqa: F401 (live chat fixtures)
from tests.guardrails.test_chat import team  # noqa: F401 (a committed admin and member)

CHECKPOINT = {
    "v": 4,
    "id": "1ef0000000000000000000000000000a",
    "ts": "2026-11-26T00:00:00+00:00",
    "channel_values": {"messages": ["my card is 4111 1111 1111 1111"]},
    "channel_versions": {"messages": "1"},
    "versions_seen": {},
}


@dataclass
class Kit:
    """The service and what it works on, for assertions."""

    service: PrivacyService
    db: Database
    redis: Redis
    keys: KeySpace
    auth: AuthService
    streams: Streams
    memory: RedisCheckpointSaver
    settings: PrivacySettings


@pytest.fixture
def privacy_settings() -> PrivacySettings:
    return PrivacySettings(purge_batch_size=3, purge_document_batch_size=2, export_page_size=2)


@pytest.fixture
def kit(
    db: Database,
    redis: Redis,
    key_prefix: str,
    settings: Settings,
    privacy_settings: PrivacySettings,
) -> Kit:
    keys = KeySpace(key_prefix)
    auth = AuthService(db, build_signer(settings), redis, keys, settings.auth)
    streams = Streams(
        runs=RunEventLog(redis, keys),
        ingestion=RunEventLog(redis, keys.child("kb")),
        vision=RunEventLog(redis, keys.child("vision")),
    )
    memory = RedisCheckpointSaver(redis, keys.child("agent"), ttl_s=3600)
    service = PrivacyService(
        db=db,
        redis=redis,
        keys=keys,
        settings=privacy_settings,
        secret=settings.security.secret_key.get_secret_value(),
        auth=auth,
        streams=streams,
        memory=memory,
    )
    return Kit(service, db, redis, keys, auth, streams, memory, privacy_settings)


@dataclass
class Seeded:
    """One user's data of every kind (ids), as `seed` made it."""

    user: User
    tenant_slug: str = ""
    conversations: list[uuid.UUID] = field(default_factory=list)
    messages: list[uuid.UUID] = field(default_factory=list)
    runs: list[uuid.UUID] = field(default_factory=list)
    documents: list[uuid.UUID] = field(default_factory=list)
    ingestion_jobs: list[uuid.UUID] = field(default_factory=list)
    vision_jobs: list[uuid.UUID] = field(default_factory=list)
    usage: list[uuid.UUID] = field(default_factory=list)
    api_key: str = ""


async def new_tenant(kit: Kit, *roles: UserRole) -> tuple[Tenant, list[User]]:
    tenant = await kit.auth.ensure_tenant(f"p-{uuid.uuid4().hex[:10]}", "Privacy")
    users = [
        await kit.auth.create_user(
            tenant_id=tenant.id,
            email=f"{role.value}{i}@{tenant.slug}.example",
            password=PASSWORD,
            role=role,
        )
        for i, role in enumerate(roles)
    ]
    return tenant, users


async def seed(kit: Kit, tenant: Tenant, user: User, *, messages: int = 3, tag: str = "") -> Seeded:
    """Conversations with messages and a finished run (its stream and memory), a document with
    chunks, an ingestion job, a vision job, usage, audit events, an API key used once (so it
    is cached) and a failed sign-in (counted in Redis under the e-mail)."""
    tenant_id = user.tenant_id
    out = Seeded(user, tenant.slug)
    async with kit.db.session(tenant_id) as session:
        conversation = Conversation(tenant_id=tenant_id, owner_id=user.id, title=f"chat {tag}")
        session.add(conversation)
        await session.flush()
        run = Run(
            tenant_id=tenant_id,
            conversation_id=conversation.id,
            user_id=user.id,
            status=RunStatus.COMPLETED,
            model="echo",
        )
        session.add(run)
        await session.flush()
        for i in range(messages):
            message = Message(
                tenant_id=tenant_id,
                conversation_id=conversation.id,
                seq=i + 1,
                role=MessageRole.USER if i % 2 == 0 else MessageRole.ASSISTANT,
                author_id=user.id if i % 2 == 0 else None,
                content=f"message {i} of {user.email} {tag}",
                run_id=run.id,
            )
            session.add(message)
            await session.flush()
            out.messages.append(message.id)
        document = Document(
            tenant_id=tenant_id,
            source=f"{user.email}-{tag}.md",
            title=f"Notes {tag}",
            media_type="text/markdown",
            content_hash="0" * 64,
            size_bytes=10,
            embedding_model="m",
            created_by=user.id,
        )
        session.add(document)
        await session.flush()
        for i, words in enumerate(("zebra quartz", "zebra lantern")):
            session.add(
                Chunk(
                    tenant_id=tenant_id,
                    document_id=document.id,
                    ord=i,
                    text=f"{words} {tag}",
                    embedding_model="m",
                    char_start=0,
                    char_end=5,
                    content_hash="0" * 64,
                )
            )
        await session.flush()
        await _count_lexemes(session, tenant_id, document.id, sign=1)
        job = IngestionJob(
            tenant_id=tenant_id, source=document.source, status="completed", created_by=user.id
        )
        analysis = VisionJob(
            tenant_id=tenant_id,
            created_by=user.id,
            status="completed",
            tasks=["ocr"],
            media_type="image/png",
            width=1,
            height=1,
            size_bytes=1,
            sha256="0" * 64,
            results={"ocr": {"result": {"text": f"invoice of {user.email}"}}},
        )
        usage = UsageRecord(
            tenant_id=tenant_id, user_id=user.id, resource="llm_tokens", subject="run", amount=5
        )
        session.add_all([job, analysis, usage])
        await session.flush()
        await record(
            session, "login", Outcome.SUCCESS, tenant_id=tenant_id, actor_id=user.id, ip="10.0.0.1"
        )
        await record(
            session,
            "user.role_changed",
            Outcome.SUCCESS,
            tenant_id=tenant_id,
            user=str(user.id),
            role="member",
        )
    out.conversations.append(conversation.id)
    out.runs.append(run.id)
    out.documents.append(document.id)
    out.ingestion_jobs.append(job.id)
    out.vision_jobs.append(analysis.id)
    out.usage.append(usage.id)
    for log, ident in (
        (kit.streams.runs, run.id),
        (kit.streams.ingestion, job.id),
        (kit.streams.vision, analysis.id),
    ):
        await log.append(str(ident), "Started", {"text": f"token of {user.email}"})  # type: ignore[attr-defined]
    await kit.memory.aput(
        {"configurable": {"thread_id": str(conversation.id), "checkpoint_ns": ""}},
        CHECKPOINT,  # type: ignore[arg-type]
        {"source": "input", "step": 0, "run_id": str(run.id)},  # type: ignore[typeddict-unknown-key]
        {"messages": "1"},
    )
    principal = await kit.auth.principal_for(tenant.slug, user.email)
    created = await kit.auth.create_api_key(principal, f"key {tag}", None, None)
    out.api_key = created.secret
    await kit.auth.authenticate(created.secret)  # verified once: cached in Redis
    await failed_sign_in(kit, tenant, user.email)  # counted in Redis under the e-mail
    return out


async def backdate(db: Database, tenant_id: uuid.UUID, table: str, days: int) -> None:
    """Moves every row of the tenant's `table` `days` into the past."""
    both = table in {"conversations", "runs", "documents", "ingestion_jobs", "vision_jobs"}
    moved = "created_at = now() - make_interval(days => :d)"
    if both:
        moved += ", updated_at = now() - make_interval(days => :d)"
    async with db.session(tenant_id) as session:
        await session.execute(text(f"UPDATE {table} SET {moved}"), {"d": days})


async def failed_sign_in(kit: Kit, tenant: Tenant, email: str) -> None:
    with contextlib.suppress(InvalidGrant):
        await kit.auth.password_grant(tenant.slug, email, "wrong password!", None, "10.0.0.9")


async def owner_rows(connection: AsyncConnection, sql: str, **params: Any) -> list[Any]:
    """Rows as the database owner, past row-level security (the sessions of the test's
    transaction leave the app role set on its connection)."""
    await connection.execute(text("RESET ROLE"))
    return list((await connection.execute(text(sql), params)).all())


async def count(db: Database, tenant_id: uuid.UUID | None, sql: str, **params: Any) -> int:
    async with db.session(tenant_id) as session:
        return int((await session.execute(text(sql), params)).scalar_one())
