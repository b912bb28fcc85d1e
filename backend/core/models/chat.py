"""Conversations, their messages, and runs (one agent turn each)."""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Index, String, Text
from sqlmodel import Field

from backend.core.models.base import (
    Timestamps,
    UUIDKey,
    by_tenant_and_age,
    json_object,
    moment,
    pg_enum,
    tenant_key,
    unfinished,
    user_ref,
    written_at,
)


class MessageRole(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Conversation(UUIDKey, Timestamps, table=True):
    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_tenant_id_owner_updated", "tenant_id", "owner_id", "updated_at"),
    )

    tenant_id: uuid.UUID = tenant_key()
    owner_id: uuid.UUID = Field(foreign_key="users.id", ondelete="CASCADE")
    title: str = Field(default="", sa_type=String(200), sa_column_kwargs={"server_default": ""})
    archived_at: datetime | None = moment()


class Message(UUIDKey, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_seq", "conversation_id", "seq", unique=True),
        by_tenant_and_age("messages"),  # purges (0008)
    )

    tenant_id: uuid.UUID = tenant_key()
    conversation_id: uuid.UUID = Field(foreign_key="conversations.id", ondelete="CASCADE")
    seq: int  # order within the conversation, from 1
    role: MessageRole = Field(sa_type=pg_enum(MessageRole, "message_role"))
    author_id: uuid.UUID | None = user_ref(index=True)  # erasures (0008)
    content: str = Field(sa_type=Text)
    complete: bool = Field(default=True, sa_column_kwargs={"server_default": "true"})
    run_id: uuid.UUID | None = None
    meta: dict[str, Any] = json_object()
    created_at: datetime = written_at()


class Run(UUIDKey, Timestamps, table=True):
    __tablename__ = "runs"
    __table_args__ = (
        by_tenant_and_age("runs"),  # purges (0008)
        unfinished("runs", RunStatus.QUEUED, RunStatus.RUNNING),  # (0009)
    )

    tenant_id: uuid.UUID = tenant_key()
    conversation_id: uuid.UUID = Field(
        foreign_key="conversations.id", ondelete="CASCADE", index=True
    )
    user_id: uuid.UUID | None = user_ref(index=True)  # erasures (0008)
    status: RunStatus = Field(sa_type=pg_enum(RunStatus, "run_status"))
    model: str = Field(sa_type=String(100))
    # the chat alias and the version of it that served (0013; null: a run from before)
    model_alias: str | None = Field(default=None, sa_type=String(100))
    model_version: str | None = Field(default=None, sa_type=String(64))
    error_code: str | None = Field(default=None, sa_type=String(64))
    message_id: uuid.UUID | None = None
    prompt_tokens: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    completion_tokens: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
