"""The JSON archive of a user's data: one object whose arrays are written row by row."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from backend.core.models import (
    ApiKey,
    AuditEvent,
    Base,
    Chunk,
    Conversation,
    Document,
    IngestionJob,
    Message,
    OAuthClient,
    RefreshToken,
    Run,
    Tenant,
    UsageRecord,
    User,
    VisionJob,
)

FORMAT = "sightline.export/1"
# Columns never exported: credentials' hashes, and what only the search index needs.
_NOT_EXPORTED = frozenset(
    {"password_hash", "secret_hash", "token_hash", "embedding", "tsv", "tenant_id"}
)

# model, column naming the user, keyset order: the flat sections, after conversations and
# documents (which nest their messages and chunks)
_SECTIONS: tuple[tuple[str, Any, str, tuple[str, ...]], ...] = (
    ("api_keys", ApiKey, "user_id", ("created_at", "id")),
    ("oauth_clients", OAuthClient, "user_id", ("created_at", "id")),
    ("sessions", RefreshToken, "user_id", ("created_at", "id")),
    ("runs", Run, "user_id", ("created_at", "id")),
    ("ingestion_jobs", IngestionJob, "created_by", ("created_at", "id")),
    ("vision_jobs", VisionJob, "created_by", ("created_at", "id")),
    ("usage", UsageRecord, "user_id", ("created_at", "id")),
    ("audit_events", AuditEvent, "actor_id", ("created_at", "id")),
)

# (model, where, keyset order) -> the rows, page by page
Pages = Callable[[Any, Any, Sequence[Any]], AsyncIterator[Any]]


async def archive(pages: Pages, tenant: Tenant, user: User) -> AsyncIterator[bytes]:
    """The archive in pieces; `pages` reads the rows (one short transaction per page)."""
    head = {
        "format": FORMAT,
        "exported_at": datetime.now(UTC).isoformat(),
        "tenant": {"id": str(tenant.id), "slug": tenant.slug, "name": tenant.name},
        "user": row(user),
    }
    yield dump(head)[:-1].encode()  # the object stays open for the arrays
    nested = (
        ("conversations", Conversation, "owner_id", "messages", Message, "conversation_id", "seq"),
        ("documents", Document, "created_by", "chunks", Chunk, "document_id", "ord"),
    )
    for name, model, owner, inner_name, inner, parent, position in nested:
        yield f',"{name}":['.encode()
        first = True
        async for item in pages(
            model, getattr(model, owner) == user.id, (model.created_at, model.id)
        ):
            body = dump(row(item))[:-1]
            yield f'{"" if first else ","}{body},"{inner_name}":['.encode()
            first = False
            comma = ""
            async for part in pages(
                inner, getattr(inner, parent) == item.id, (getattr(inner, position),)
            ):
                yield (comma + dump(row(part))).encode()
                comma = ","
            yield b"]}"
        yield b"]"
    for name, model, column, order in _SECTIONS:
        yield f',"{name}":['.encode()
        comma = ""
        async for item in pages(
            model, getattr(model, column) == user.id, tuple(getattr(model, c) for c in order)
        ):
            yield (comma + dump(row(item))).encode()
            comma = ","
        yield b"]"
    yield b"}\n"


def row(item: Base) -> dict[str, Any]:
    """A row's exported columns as JSON values (the table's own pydantic serialisation: ids and
    decimals as strings, times in ISO 8601, enums as their values)."""
    return item.model_dump(mode="json", exclude=_NOT_EXPORTED)


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
