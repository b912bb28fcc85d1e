"""Queries of conversations and messages (inside a tenant-scoped unit of work)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from backend.core.db import Database
from backend.core.models import Conversation, Message, MessageRole, Run, RunStatus


async def owned(
    session: AsyncSession, conversation_id: uuid.UUID, owner_id: uuid.UUID
) -> Conversation | None:
    return await session.scalar(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.owner_id == owner_id
        )
    )


async def list_owned(
    session: AsyncSession,
    owner_id: uuid.UUID,
    limit: int,
    archived: bool,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Conversation]:
    query = select(Conversation).where(Conversation.owner_id == owner_id)
    query = query.where(
        Conversation.archived_at.is_not(None) if archived else Conversation.archived_at.is_(None)
    )
    if after is not None:
        query = query.where(tuple_(Conversation.updated_at, Conversation.id) < tuple_(*after))
    query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit)
    return list(await session.scalars(query))


async def messages_after(
    session: AsyncSession, conversation_id: uuid.UUID, after_seq: int, limit: int
) -> list[Message]:
    return list(
        await session.scalars(
            select(Message)
            .where(Message.conversation_id == conversation_id, Message.seq > after_seq)
            .order_by(Message.seq)
            .limit(limit)
        )
    )


async def first_user_message(session: AsyncSession, conversation_id: uuid.UUID) -> str | None:
    return await session.scalar(
        select(Message.content)
        .where(Message.conversation_id == conversation_id, Message.role == MessageRole.USER)
        .order_by(Message.seq)
        .limit(1)
    )


async def next_seq(session: AsyncSession, conversation_id: uuid.UUID) -> int:
    # The conversation row is locked by the caller, so two appends never take the same seq.
    current = await session.scalar(
        select(func.max(Message.seq)).where(Message.conversation_id == conversation_id)
    )
    return int(current or 0) + 1


async def answer_and_last_seq(
    session: AsyncSession, conversation_id: uuid.UUID, run_id: uuid.UUID
) -> tuple[uuid.UUID | None, int]:
    """The run's answer (None: not stored) and the conversation's last seq, in one round trip
    (the caller holds the conversation's lock)."""
    answer = (
        select(Message.id)
        .where(Message.run_id == run_id, Message.role == MessageRole.ASSISTANT)
        .limit(1)
        .scalar_subquery()
    )
    last = (
        select(func.max(Message.seq))
        .where(Message.conversation_id == conversation_id)
        .scalar_subquery()
    )
    row = (await session.execute(select(answer, last))).one()
    return row[0], int(row[1] or 0)


# Written out rather than built with the expression language: building and keying a
# statement costs more client time per turn than PostgreSQL takes to run it.
_START_TURN = text(
    "SELECT owned, busy, seq, created_at FROM sightline_start_turn(:role, :tenant, "
    "CAST(:conversation_id AS uuid), CAST(:user_id AS uuid), CAST(:run_id AS uuid), "
    "CAST(:model AS varchar), CAST(:model_alias AS varchar), CAST(:model_version AS varchar), "
    "CAST(:now AS timestamptz), CAST(:reject_busy AS boolean), CAST(:message_id AS uuid), "
    "CAST(:content AS text), CAST(:meta AS jsonb))"
)


async def start_turn(db: Database, run: Run, message: Message, *, reject_busy: bool) -> _Turn:
    """A turn's rows, as one statement in a transaction of its own (sightline_start_turn,
    migration 0019): the caller's conversation locked, then the run, its user message at the
    conversation's next seq, and the conversation's `updated_at`. The run is stored RUNNING,
    or QUEUED behind a run of the conversation still going; with `reject_busy` and one going,
    nothing is written. Fills in `run.status`, `message.seq` and `message.created_at`."""
    row = await db.alone(
        run.tenant_id,
        _START_TURN,
        {
            "conversation_id": run.conversation_id,
            "run_id": run.id,
            "user_id": run.user_id,
            "model": run.model,
            "model_alias": run.model_alias,
            "model_version": run.model_version,
            "now": run.created_at,
            "reject_busy": reject_busy,
            "message_id": message.id,
            "content": message.content,
            "meta": json.dumps(message.meta or {}),
        },
    )
    owned, busy, seq, created_at = row
    if seq is not None:
        run.status = RunStatus.QUEUED if busy is not None else RunStatus.RUNNING
        message.seq, message.created_at = seq, created_at
    return _Turn(bool(owned), busy)


class _Turn(NamedTuple):
    owned: bool  # False: no such conversation of the caller's (nothing written)
    busy: uuid.UUID | None  # the conversation's run still going


async def lock(session: AsyncSession, conversation_id: uuid.UUID) -> Conversation | None:
    return await session.scalar(
        select(Conversation).where(Conversation.id == conversation_id).with_for_update()
    )
