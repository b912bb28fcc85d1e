"""Queries of the identity tables. Runs inside a tenant-scoped unit of work unless noted."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.core.models import ApiKey, AuditEvent, OAuthClient, RefreshToken, Tenant, User


async def tenant_by_slug(session: AsyncSession, slug: str) -> Tenant | None:
    """Tenants are not tenant-scoped: any unit of work can read them."""
    return await session.scalar(select(Tenant).where(Tenant.slug == slug))


async def plan_of(session: AsyncSession, tenant_id: uuid.UUID) -> str:
    return await session.scalar(select(Tenant.plan).where(Tenant.id == tenant_id)) or ""


async def user_by_email(session: AsyncSession, email: str) -> User | None:
    return await session.scalar(select(User).where(func.lower(User.email) == email.lower()))


async def user_by_id(
    session: AsyncSession, user_id: uuid.UUID, *, lock: bool = False
) -> User | None:
    """`lock`: a share lock until the unit of work ends. Grants take it and sign their tokens
    before committing, so a user disabled meanwhile (which waits for the lock, then records
    its revocation) can never be issued a token after the revocation's time."""
    if lock:
        return await session.get(User, user_id, with_for_update={"read": True})
    return await session.get(User, user_id)


async def tenant_of(session: AsyncSession, function: str, value: str | bytes) -> uuid.UUID | None:
    """Which tenant a credential belongs to, before the tenant is known (SECURITY DEFINER)."""
    assert function in {
        "sightline_find_api_key",
        "sightline_find_refresh_token",
        "sightline_find_oauth_client",
    }
    return await session.scalar(text(f"SELECT {function}(:value)"), {"value": value})


async def api_key_by_prefix(session: AsyncSession, prefix: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))


async def api_keys_of(session: AsyncSession, user_id: uuid.UUID | None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at.desc())
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    return list(await session.scalars(query))


async def touch_api_key(session: AsyncSession, key_id: uuid.UUID) -> None:
    await session.execute(
        update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=datetime.now(UTC))
    )


async def client_by_id(session: AsyncSession, client_id: str) -> OAuthClient | None:
    return await session.scalar(select(OAuthClient).where(OAuthClient.client_id == client_id))


async def refresh_token_by_hash(session: AsyncSession, token_hash: bytes) -> RefreshToken | None:
    return await session.scalar(
        select(RefreshToken).where(RefreshToken.token_hash == token_hash).with_for_update()
    )


async def revoke_family(session: AsyncSession, family_id: uuid.UUID) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


async def revoke_refresh_tokens_of(session: AsyncSession, user_id: uuid.UUID) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


async def users(session: AsyncSession) -> list[User]:
    return list(await session.scalars(select(User).order_by(User.created_at)))


async def owners_count(session: AsyncSession) -> int:
    from backend.core.models import UserRole

    return int(
        await session.scalar(
            select(func.count())
            .select_from(User)
            .where(User.role == UserRole.OWNER, User.is_active.is_(True))
        )
        or 0
    )


async def audit_events(
    session: AsyncSession, first: int, event: str | None, before_id: int | None
) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(first)
    if event:
        query = query.where(AuditEvent.event == event)
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    return list(await session.scalars(query))
