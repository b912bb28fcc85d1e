"""Queries of data protection: policies, batched deletes by age or by owner, pseudonymising the
audit log, and reading a user's rows page by page. Runs inside a tenant-scoped unit of work
unless noted; every statement touches at most `limit` rows."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from backend.core.models import (
    ApiKey,
    AuditEvent,
    Conversation,
    JobStatus,
    Message,
    OAuthClient,
    PrivacyPolicyRow,
    RefreshToken,
    Run,
    RunStatus,
    Tenant,
    UsageRecord,
    User,
    UserRole,
    VisionStatus,
)

ACTIVE_RUN = (RunStatus.QUEUED, RunStatus.RUNNING)
ACTIVE_INGESTION = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.RETRYING.value)
ACTIVE_VISION = (VisionStatus.QUEUED.value, VisionStatus.RUNNING.value)

# -- policies -------------------------------------------------------------------------------


async def stored_policy(session: AsyncSession, tenant_id: uuid.UUID) -> dict[str, Any] | None:
    return await session.scalar(
        select(PrivacyPolicyRow.policy).where(PrivacyPolicyRow.tenant_id == tenant_id)
    )


async def lock_policy(session: AsyncSession, tenant_id: uuid.UUID) -> dict[str, Any] | None:
    return await session.scalar(
        select(PrivacyPolicyRow.policy)
        .where(PrivacyPolicyRow.tenant_id == tenant_id)
        .with_for_update()
    )


async def save_policy(
    session: AsyncSession, tenant_id: uuid.UUID, document: dict[str, Any], user_id: uuid.UUID | None
) -> None:
    await session.execute(
        insert(PrivacyPolicyRow)
        .values(tenant_id=tenant_id, policy=document, updated_by=user_id)
        .on_conflict_do_update(
            index_elements=[PrivacyPolicyRow.tenant_id],
            set_={"policy": document, "updated_by": user_id, "updated_at": func.now()},
        )
    )


# -- tenants and users (tenants are not tenant-scoped: any unit of work reads them) ---------


async def tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant | None:
    return await session.get(Tenant, tenant_id)


async def lock_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant | None:
    return await session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update())


async def tenants_after(session: AsyncSession, after: uuid.UUID | None, limit: int) -> list[Tenant]:
    """Tenants in id order (the purge walks them page by page)."""
    query = select(Tenant).order_by(Tenant.id).limit(limit)
    if after is not None:
        query = query.where(Tenant.id > after)
    return list(await session.scalars(query))


async def tenants_being_erased(session: AsyncSession) -> list[uuid.UUID]:
    return list(
        await session.scalars(select(Tenant.id).where(Tenant.erasure_requested_at.is_not(None)))
    )


async def users_being_erased(session: AsyncSession) -> list[uuid.UUID]:
    return list(
        await session.scalars(select(User.id).where(User.erasure_requested_at.is_not(None)))
    )


async def lock_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.scalar(select(User).where(User.id == user_id).with_for_update())


async def lock_owners(session: AsyncSession) -> list[uuid.UUID]:
    """The tenant's owners who can still act, locked in id order (every erasure locks them in
    the same order, before its subject: two at once wait for each other, never deadlock, and
    cannot each count on the other's owner)."""
    return list(
        await session.scalars(
            select(User.id)
            .where(
                User.role == UserRole.OWNER,
                User.is_active.is_(True),
                User.erasure_requested_at.is_(None),
            )
            .order_by(User.id)
            .with_for_update()
        )
    )


async def revoke_credentials(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> None:
    """Ends the user's refresh token families, API keys and client credentials."""
    for model in (RefreshToken, ApiKey, OAuthClient):
        await session.execute(
            update(model)
            .where(model.user_id == user_id, model.revoked_at.is_(None))
            .values(revoked_at=now)
        )


async def revoke_batch(session: AsyncSession, limit: int, *, model: Any) -> int:
    """Revokes up to `limit` of the tenant's unrevoked refresh tokens, keys or clients."""
    batch = await ids(session, model, model.revoked_at.is_(None), limit=limit)
    if batch:
        await session.execute(
            update(model).where(model.id.in_(batch)).values(revoked_at=func.now())
        )
    return len(batch)


async def api_key_hashes(
    session: AsyncSession, user_id: uuid.UUID | None, key_ids: Sequence[uuid.UUID] | None = None
) -> list[bytes]:
    """The secret hashes of a user's API keys, or of the keys `key_ids`."""
    query = select(ApiKey.secret_hash)
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    if key_ids is not None:
        query = query.where(ApiKey.id.in_(key_ids))
    return list(await session.scalars(query))


async def emails(session: AsyncSession, user_ids: Sequence[uuid.UUID]) -> list[str]:
    return list(await session.scalars(select(User.email).where(User.id.in_(user_ids))))


async def active_runs(
    session: AsyncSession, user_id: uuid.UUID | None, changed_since: datetime
) -> dict[uuid.UUID, uuid.UUID]:
    """Runs queued or running that changed since `changed_since` (the user's, or the tenant's
    when None), with their conversations."""
    query = select(Run.id, Run.conversation_id).where(
        Run.status.in_(ACTIVE_RUN), Run.updated_at >= changed_since
    )
    if user_id is not None:
        query = query.where(Run.user_id == user_id)
    return {row[0]: row[1] for row in await session.execute(query)}


# -- batches --------------------------------------------------------------------------------


async def ids(
    session: AsyncSession,
    model: Any,
    *where: ColumnElement[bool],
    limit: int,
    order_by: InstrumentedAttribute[Any] | None = None,
    skip_locked: bool = False,
) -> list[Any]:
    """Up to `limit` ids of rows matching `where`, locked for the rest of the unit of work
    (rows another transaction holds are skipped with `skip_locked`: purges on several
    replicas never wait for each other)."""
    query: Select[Any] = select(model.id).where(*where).limit(limit)
    if order_by is not None:
        query = query.order_by(order_by)
    query = query.with_for_update(skip_locked=skip_locked)
    return list(await session.scalars(query))


async def delete_ids(session: AsyncSession, model: Any, ids_: Sequence[Any]) -> int:
    if not ids_:
        return 0
    result = await session.execute(delete(model).where(model.id.in_(ids_)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def run_ids_of(session: AsyncSession, conversation_ids: Sequence[uuid.UUID]) -> list[Any]:
    return list(
        await session.scalars(select(Run.id).where(Run.conversation_id.in_(conversation_ids)))
    )


async def delete_messages_of(
    session: AsyncSession, conversation_ids: Sequence[uuid.UUID], limit: int
) -> int:
    batch = await ids(session, Message, Message.conversation_id.in_(conversation_ids), limit=limit)
    return await delete_ids(session, Message, batch)


async def delete_rows(session: AsyncSession, limit: int, *, table: str) -> int:
    """Deletes up to `limit` of the tenant's rows of a table without an `id` column."""
    assert table in {"lexeme_stats", "guardrail_policies", "privacy_policies"}
    result = await session.execute(
        text(f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} LIMIT :n)"),  # noqa: S608
        {"n": limit},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def conversations_touched(
    session: AsyncSession, message_ids: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    return list(
        await session.scalars(
            select(Message.conversation_id).where(Message.id.in_(message_ids)).distinct()
        )
    )


async def empty_conversations(
    session: AsyncSession, before: datetime, limit: int
) -> list[uuid.UUID]:
    """Conversations untouched since `before` with no message (and so no run) left."""
    no_message = ~select(Message.id).where(Message.conversation_id == Conversation.id).exists()
    no_run = ~select(Run.id).where(Run.conversation_id == Conversation.id).exists()
    return await ids(
        session,
        Conversation,
        Conversation.updated_at < before,
        no_message,
        no_run,
        limit=limit,
        skip_locked=True,
    )


async def anonymise_usage(session: AsyncSession, user_id: uuid.UUID, limit: int) -> int:
    batch = await ids(session, UsageRecord, UsageRecord.user_id == user_id, limit=limit)
    if not batch:
        return 0
    await session.execute(update(UsageRecord).where(UsageRecord.id.in_(batch)).values(user_id=None))
    return len(batch)


async def audit_page(
    session: AsyncSession, after: tuple[datetime, int] | None, limit: int
) -> list[tuple[datetime, int]]:
    """The next `limit` of the tenant's audit events in (created_at, id) order."""
    query = select(AuditEvent.created_at, AuditEvent.id).order_by(
        AuditEvent.created_at, AuditEvent.id
    )
    if after is not None:
        query = query.where(tuple_(AuditEvent.created_at, AuditEvent.id) > tuple_(*after))
    return [(row[0], row[1]) for row in await session.execute(query.limit(limit))]


_PSEUDONYMISE = text("""
    UPDATE audit_events SET
      actor_id = CASE WHEN actor_id = :uid THEN :pid ELSE actor_id END,
      details = details
        || CASE WHEN details->>'user' = CAST(:uid_text AS text)
                THEN jsonb_build_object('user', CAST(:pseudonym AS text)) ELSE '{}'::jsonb END
        || CASE WHEN CAST(:email AS text) <> '' AND lower(details->>'email') = lower(:email)
                THEN jsonb_build_object('email', CAST(:pseudonym AS text)) ELSE '{}'::jsonb END
        || CASE WHEN actor_id = :uid AND jsonb_exists(details, 'subject')
                THEN jsonb_build_object('subject', CAST(:pseudonym AS text)) ELSE '{}'::jsonb END
    WHERE id = ANY(:ids)
      AND (actor_id = :uid OR details->>'user' = CAST(:uid_text AS text)
           OR (CAST(:email AS text) <> '' AND lower(details->>'email') = lower(:email)))
""")


async def pseudonymise_audit(
    session: AsyncSession,
    event_ids: Sequence[int],
    *,
    user_id: uuid.UUID,
    email: str,
    pseudonym: str,
    pseudonymous_id: uuid.UUID,
) -> int:
    """Among `event_ids`, the events naming the user (as actor, as `user`, by e-mail, or an
    identity provider's `subject` of theirs) keep the pseudonym instead; returns how many."""
    if not event_ids:
        return 0
    result = await session.execute(
        _PSEUDONYMISE,
        {
            "ids": list(event_ids),
            "uid": user_id,
            "uid_text": str(user_id),
            "pid": pseudonymous_id,
            "email": email,
            "pseudonym": pseudonym,
        },
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def pseudonymise_unscoped_audit(
    session: AsyncSession, email: str, pseudonym: str, limit: int
) -> int:
    """Audit events of no tenant (throttled sign-ins) that carry the e-mail (SECURITY DEFINER:
    the app role cannot read them)."""
    return int(
        await session.scalar(
            text("SELECT sightline_pseudonymise_unscoped_audit(:email, :pseudonym, :n)"),
            {"email": email, "pseudonym": pseudonym, "n": limit},
        )
        or 0
    )


async def purge_unscoped_audit(session: AsyncSession, before: datetime, limit: int) -> int:
    return int(
        await session.scalar(
            text("SELECT sightline_purge_unscoped_audit(:before, :n)"),
            {"before": before, "n": limit},
        )
        or 0
    )


async def erased_before(session: AsyncSession, event: str, pseudonym: str) -> bool:
    """Whether the (visible) audit log records the erasure of the subject with this pseudonym."""
    found = await session.scalar(
        select(AuditEvent.id)
        .where(
            AuditEvent.event == event,
            AuditEvent.details["subject"].astext == pseudonym,
        )
        .limit(1)
    )
    return found is not None


# -- a user's rows, page by page (exports) -------------------------------------------------


async def page(
    session: AsyncSession,
    model: Any,
    *where: ColumnElement[bool],
    order: Sequence[InstrumentedAttribute[Any]],
    after: tuple[Any, ...] | None,
    limit: int,
) -> list[Any]:
    """The next `limit` rows of `model` matching `where`, in keyset order `order` after the key
    `after` (None: from the start)."""
    query = select(model).where(*where).order_by(*order).limit(limit)
    if after is not None:
        query = query.where(tuple_(*order) > tuple_(*after))
    return list(await session.scalars(query))
