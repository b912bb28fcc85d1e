"""Queries of conversations and messages (inside a tenant-scoped unit of work)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Table, case, exists, func, insert, literal, or_, select, true, tuple_, update
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


async def insert_turn(
    session: AsyncSession, run: Run, message: Message, *, reject_busy: bool
) -> uuid.UUID | None:
    """A turn's rows in one statement, under the conversation's lock (the caller's): the run,
    its user message at the conversation's next seq, and the conversation's `updated_at`.

    The statement runs after the lock was granted, so its snapshot holds every run and message
    committed before (in one statement with the lock, a wait for it would leave the snapshot
    taken before the wait). The run is stored RUNNING, or QUEUED behind a run of the
    conversation still going; with `reject_busy` and one going, nothing is written. Returns
    the run going (None: none). Fills in `run.status`, `message.seq` and `message.created_at`
    (the objects are not added to the session)."""
    conversation_id = run.conversation_id
    runs, messages = Run.__table__, Message.__table__
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
        select(func.coalesce(func.max(Message.seq), 0))
        .where(Message.conversation_id == conversation_id)
        .scalar_subquery()
    )
    state = select(going.label("busy"), last.label("last")).cte("state")
    status = case(
        (state.c.busy.is_(None), literal(RunStatus.RUNNING, runs.c.status.type)),
        else_=literal(RunStatus.QUEUED, runs.c.status.type),
    )
    run_values = _given(runs, run, skip={"status"})
    new_run = (
        insert(runs)
        .from_select(
            [*run_values, "status"],
            select(*run_values.values(), status).where(
                or_(state.c.busy.is_(None), literal(not reject_busy))
            ),
        )
        .returning(runs.c.id)
        .cte("new_run")
    )
    message_values = _given(messages, message, skip={"seq", "created_at"})
    new_message = (
        insert(messages)
        .from_select(
            [*message_values, "seq"],
            select(*message_values.values(), state.c.last + 1).select_from(state, new_run),
        )
        .returning(messages.c.seq, messages.c.created_at)
        .cte("new_message")
    )
    touched = (
        update(Conversation.__table__)
        .where(Conversation.__table__.c.id == conversation_id, exists(select(new_run.c.id)))
        .values(updated_at=run.created_at)
        .cte("touched")
    )
    row = (
        await session.execute(
            select(state.c.busy, new_message.c.seq, new_message.c.created_at)
            .select_from(state.outerjoin(new_message, true()))
            .add_cte(touched)
        )
    ).one()
    busy, seq, created_at = row
    if seq is not None:
        run.status = RunStatus.QUEUED if busy is not None else RunStatus.RUNNING
        message.seq, message.created_at = seq, created_at
    return busy


def _given(table: Table, row: Any, *, skip: set[str]) -> dict[str, Any]:
    """The values `row` holds for `table`'s columns, typed (None: the column's default)."""
    values = {}
    for column in table.columns:
        value = getattr(row, column.key, None)
        if column.name not in skip and value is not None:
            values[column.name] = literal(value, column.type)
    return values


async def lock(session: AsyncSession, conversation_id: uuid.UUID) -> Conversation | None:
    return await session.scalar(
        select(Conversation).where(Conversation.id == conversation_id).with_for_update()
    )
