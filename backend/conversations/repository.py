"""Queries of conversations and messages (inside a tenant-scoped unit of work)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

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


async def going_run_and_last_seq(
    session: AsyncSession, conversation_id: uuid.UUID
) -> tuple[uuid.UUID | None, int]:
    """A run of the conversation still going (None: none), and its last message's seq, in one
    round trip. The caller holds the conversation's lock: this statement, run after it, sees
    every run and message committed before the lock was granted."""
    going = (
        select(Run.id)
        .where(
            Run.conversation_id == conversation_id,
            Run.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]),
        )
        .limit(1)
        .scalar_subquery()
    )
    last = (
        select(func.max(Message.seq))
        .where(Message.conversation_id == conversation_id)
        .scalar_subquery()
    )
    row = (await session.execute(select(going, last))).one()
    return row[0], int(row[1] or 0)


async def lock(session: AsyncSession, conversation_id: uuid.UUID) -> Conversation | None:
    return await session.scalar(
        select(Conversation).where(Conversation.id == conversation_id).with_for_update()
    )
