"""Conversations of a user: create, list, rename, archive, delete; append messages."""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.conversations import repository as repo
from backend.core import pagination
from backend.core.db import Database
from backend.core.models import Conversation, Message, MessageRole, Run
from backend.errors import NotFound, ValidationFailed

MAX_TITLE = 200
# Markdown that says nothing in a title: a line's block marks, emphasis and code marks.
_BLOCK_MARK = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|[-*+]\s+|\d+[.)]\s+)+")
_INLINE_MARK = re.compile(r"[*_`~]+")


def _title(title: str) -> str:
    title = " ".join(title.split())
    if len(title) > MAX_TITLE:
        raise ValidationFailed(f"title is longer than {MAX_TITLE} characters", field="title")
    return title


def title_of(question: str, max_chars: int) -> str:
    """A title made of a question: its first line with text, without Markdown marks, cut at a
    word boundary to at most `max_chars` (an ellipsis says it was cut)."""
    line = ""
    for raw in question.splitlines():
        line = " ".join(_INLINE_MARK.sub("", _BLOCK_MARK.sub("", raw)).split())
        if line:
            break
    max_chars = min(max_chars, MAX_TITLE)
    if len(line) <= max_chars:
        return line
    cut = line[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # a word boundary not too far back
        cut = cut[:space]
    return cut.rstrip(" ,;:.-") + "…"


# How many (tenant, user, conversation) this replica remembers as the user's (`check_owned`).
_KNOWN_OWNED = 20_000


class ConversationService:
    def __init__(self, db: Database) -> None:
        self._db = db
        # Conversations created or found here as their owner's, most recent last: every chat
        # turn's early NOT_FOUND check needs no transaction of its own for them.
        self._known: OrderedDict[tuple[uuid.UUID, uuid.UUID, uuid.UUID], None] = OrderedDict()

    def _remember(self, principal: Principal, conversation_id: uuid.UUID) -> None:
        key = (principal.tenant_id, principal.user_id, conversation_id)
        self._known[key] = None
        self._known.move_to_end(key)
        while len(self._known) > _KNOWN_OWNED:
            self._known.popitem(last=False)

    def _forget(self, principal: Principal, conversation_id: uuid.UUID) -> None:
        self._known.pop((principal.tenant_id, principal.user_id, conversation_id), None)

    async def check_owned(self, principal: Principal, conversation_id: uuid.UUID) -> None:
        """NOT_FOUND unless the conversation is the caller's, as an early check: one this
        replica created or found as the caller's is taken as such without a query. It may have
        been deleted since (on another replica), so a writer checks again under the lock
        (`owned_for_update`, `start_turn`), which is authoritative."""
        if (principal.tenant_id, principal.user_id, conversation_id) in self._known:
            return
        await self.get(principal, conversation_id)

    async def create(self, principal: Principal, title: str = "") -> Conversation:
        async with self._db.session(principal.tenant_id) as session:
            now = datetime.now(UTC)  # not now(): that is the transaction's start, shared by many
            conversation = Conversation(
                tenant_id=principal.tenant_id,
                owner_id=principal.user_id,
                title=_title(title),
                created_at=now,
                updated_at=now,
            )
            session.add(conversation)  # every column is set here: nothing to read back
        self._remember(principal, conversation.id)
        return conversation

    async def get(self, principal: Principal, conversation_id: uuid.UUID) -> Conversation:
        async with self._db.session(principal.tenant_id) as session:
            conversation = await self._owned(session, principal, conversation_id)
        self._remember(principal, conversation_id)
        return conversation

    async def list(
        self, principal: Principal, first: int, after: str | None, archived: bool
    ) -> pagination.Page[Conversation]:
        limit = pagination.page_size(first)
        key = None
        if after:
            updated, ident = pagination.decode(after, "conversation", 2)
            try:
                key = (datetime.fromisoformat(updated), uuid.UUID(ident))
            except (TypeError, ValueError):
                raise ValidationFailed("malformed cursor", field="after") from None
        async with self._db.session(principal.tenant_id) as session:
            rows = await repo.list_owned(session, principal.user_id, limit + 1, archived, key)
        items = rows[:limit]
        return pagination.Page(
            items=items,
            cursors=[
                pagination.encode("conversation", c.updated_at.isoformat(), c.id) for c in items
            ],
            has_next=len(rows) > limit,
        )

    async def rename(
        self, principal: Principal, conversation_id: uuid.UUID, title: str
    ) -> Conversation:
        async with self._db.session(principal.tenant_id) as session:
            conversation = await self._owned(session, principal, conversation_id)
            conversation.title = _title(title)
            conversation.updated_at = datetime.now(UTC)
        return conversation

    async def archive(
        self, principal: Principal, conversation_id: uuid.UUID, archived: bool
    ) -> Conversation:
        async with self._db.session(principal.tenant_id) as session:
            conversation = await self._owned(session, principal, conversation_id)
            conversation.archived_at = datetime.now(UTC) if archived else None
        return conversation

    async def delete(self, principal: Principal, conversation_id: uuid.UUID) -> None:
        async with self._db.session(principal.tenant_id) as session:
            conversation = await self._owned(session, principal, conversation_id)
            await session.delete(conversation)
        self._forget(principal, conversation_id)

    async def messages(
        self, principal: Principal, conversation_id: uuid.UUID, first: int, after: str | None
    ) -> pagination.Page[Message]:
        limit = pagination.page_size(first)
        after_seq = 0
        if after:
            (after_seq,) = pagination.decode(after, f"messages:{conversation_id}", 1)
            if not isinstance(after_seq, int):
                raise ValidationFailed("malformed cursor", field="after")
        async with self._db.session(principal.tenant_id) as session:
            await self._owned(session, principal, conversation_id)
            rows = await repo.messages_after(session, conversation_id, after_seq, limit + 1)
        items = rows[:limit]
        return pagination.Page(
            items=items,
            cursors=[pagination.encode(f"messages:{conversation_id}", m.seq) for m in items],
            has_next=len(rows) > limit,
        )

    async def start_turn(
        self, principal: Principal, run: Run, message: Message, *, reject_busy: bool
    ) -> uuid.UUID | None:
        """A turn's run and its user message at the caller's conversation's next seq, under
        its lock, in one round trip (see `repository.start_turn`); NOT_FOUND unless the
        conversation is the caller's. Returns the conversation's run still going, if any
        (with `reject_busy`, nothing is written then)."""
        turn = await repo.start_turn(self._db, run, message, reject_busy=reject_busy)
        if not turn.owned:
            self._forget(principal, run.conversation_id)
            raise NotFound("no such conversation", id=str(run.conversation_id))
        return turn.busy

    @staticmethod
    async def answer_and_last_seq(
        session: AsyncSession, conversation: Conversation, run_id: uuid.UUID
    ) -> tuple[uuid.UUID | None, int]:
        """Under the conversation's lock: the run's stored answer (None: none yet) and the
        conversation's last seq, in one round trip."""
        return await repo.answer_and_last_seq(session, conversation.id, run_id)

    async def owned_for_update(
        self, session: AsyncSession, principal: Principal, conversation_id: uuid.UUID
    ) -> Conversation:
        """The caller's conversation, locked for the rest of the unit of work."""
        conversation = await repo.lock(session, conversation_id)
        if conversation is None or conversation.owner_id != principal.user_id:
            raise NotFound("no such conversation", id=str(conversation_id))
        return conversation

    @staticmethod
    async def append(
        session: AsyncSession,
        conversation: Conversation,
        role: MessageRole,
        content: str,
        *,
        author_id: uuid.UUID | None = None,
        run_id: uuid.UUID | None = None,
        complete: bool = True,
        meta: dict[str, Any] | None = None,
        seq: int | None = None,
    ) -> Message:
        """Adds a message at the end, in the caller's unit of work, which holds the
        conversation's lock (`owned_for_update`): the sequence number is read under it (`seq`:
        the caller read it under that lock already)."""
        if seq is None:
            # Not flushed before the read: the conversation's pending changes (a title) go
            # with `updated_at` in the flush below, one UPDATE.
            with session.no_autoflush:
                seq = await repo.next_seq(session, conversation.id)
        message = Message(
            tenant_id=conversation.tenant_id,
            conversation_id=conversation.id,
            seq=seq,
            role=role,
            author_id=author_id,
            content=content,
            run_id=run_id,
            complete=complete,
            meta=meta or {},
        )
        session.add(message)
        conversation.updated_at = datetime.now(UTC)
        await session.flush()
        return message

    @staticmethod
    async def title_untitled(
        session: AsyncSession,
        conversation: Conversation,
        max_chars: int,
        *,
        first: Message | None = None,
    ) -> None:
        """Gives a conversation without a title one made of its first question (the caller's
        unit of work; the conversation is locked). A title already there is kept. `first`: a
        message the caller holds; when it is the conversation's first (seq 1) and the user's,
        it is that question (no query)."""
        if conversation.title or max_chars <= 0:
            return
        if first is not None and first.seq == 1 and first.role is MessageRole.USER:
            question: str | None = first.content
        else:
            question = await repo.first_user_message(session, conversation.id)
        if question:
            conversation.title = title_of(question, max_chars)

    @staticmethod
    async def _owned(
        session: AsyncSession, principal: Principal, conversation_id: uuid.UUID
    ) -> Conversation:
        conversation = await repo.owned(session, conversation_id, principal.user_id)
        if conversation is None:  # another user's, another tenant's (RLS), or none at all
            raise NotFound("no such conversation", id=str(conversation_id))
        return conversation
