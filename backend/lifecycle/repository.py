"""Queries of the model registry. Registry tables are platform tables (any unit of work reads
them); pins are the tenant's (row-level security), all of them only through
`sightline_model_pins()`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from backend.core.models import (
    ModelPin,
    ModelVersionRow,
    RegistryModel,
    RegistryRevision,
    Tenant,
    TrafficPolicyRevision,
    TrafficPolicyRow,
)

# -- the registry's revision ---------------------------------------------------------------


async def lock_registry(session: AsyncSession) -> int:
    """Takes the registry's change lock until the unit of work ends; its revision now."""
    return int(
        await session.scalar(
            select(RegistryRevision.revision).where(RegistryRevision.id == 1).with_for_update()
        )
        or 0
    )


async def bump_revision(session: AsyncSession) -> int:
    return int(
        await session.scalar(
            update(RegistryRevision)
            .where(RegistryRevision.id == 1)
            .values(revision=RegistryRevision.revision + 1)
            .returning(RegistryRevision.revision)
        )
        or 0
    )


async def revision(session: AsyncSession) -> int:
    return int(
        await session.scalar(select(RegistryRevision.revision).where(RegistryRevision.id == 1)) or 0
    )


# -- models and versions ---------------------------------------------------------------------


async def model(session: AsyncSession, name: str) -> RegistryModel | None:
    return await session.get(RegistryModel, name)


async def models(session: AsyncSession) -> list[RegistryModel]:
    return list(await session.scalars(select(RegistryModel).order_by(RegistryModel.name)))


async def add_model(session: AsyncSession, name: str, kind: str, task: str) -> bool:
    """Adds the model unless it exists; whether it was added."""
    added = await session.scalar(
        insert(RegistryModel)
        .values(name=name, kind=kind, task=task)
        .on_conflict_do_nothing()
        .returning(RegistryModel.name)
    )
    return added is not None


async def versions(session: AsyncSession, model: str | None = None) -> list[ModelVersionRow]:
    """The versions of `model` (of every model: None), oldest first."""
    query = select(ModelVersionRow).order_by(ModelVersionRow.model, ModelVersionRow.registered_at)
    if model is not None:
        query = query.where(ModelVersionRow.model == model)
    return list(await session.scalars(query))


async def version(
    session: AsyncSession, model: str, version: str, *, lock: bool = False
) -> ModelVersionRow | None:
    query = select(ModelVersionRow).where(
        ModelVersionRow.model == model, ModelVersionRow.version == version
    )
    if lock:
        query = query.with_for_update()
    return await session.scalar(query)


async def add_version(
    session: AsyncSession,
    *,
    model: str,
    version: str,
    spec: dict[str, Any],
    sha256: str | None,
    status: str,
    registered_by: uuid.UUID | None,
    notes: str = "",
) -> bool:
    """Adds the version unless the model has it; whether it was added."""
    added = await session.scalar(
        insert(ModelVersionRow)
        .values(
            model=model,
            version=version,
            spec=spec,
            sha256=sha256,
            status=status,
            registered_by=registered_by,
            notes=notes,
        )
        .on_conflict_do_nothing(index_elements=["model", "version"])
        .returning(ModelVersionRow.id)
    )
    return added is not None


async def set_status(
    session: AsyncSession, model: str, version: str, status: str, error: str | None = None
) -> None:
    await session.execute(
        update(ModelVersionRow)
        .where(ModelVersionRow.model == model, ModelVersionRow.version == version)
        .values(status=status, error=error)
    )


# -- traffic policies ------------------------------------------------------------------------


async def policy(session: AsyncSession, model: str) -> TrafficPolicyRow | None:
    return await session.get(TrafficPolicyRow, model)


async def policies(session: AsyncSession) -> list[TrafficPolicyRow]:
    return list(await session.scalars(select(TrafficPolicyRow)))


async def add_policy(session: AsyncSession, model: str, values: dict[str, Any]) -> bool:
    """Adds the model's first policy unless it has one; whether it was added."""
    added = await session.scalar(
        insert(TrafficPolicyRow)
        .values(model=model, **values)
        .on_conflict_do_nothing()
        .returning(TrafficPolicyRow.model)
    )
    return added is not None


async def save_policy(session: AsyncSession, model: str, values: dict[str, Any]) -> None:
    await session.execute(
        insert(TrafficPolicyRow)
        .values(model=model, **values)
        .on_conflict_do_update(index_elements=["model"], set_={**values, "updated_at": func.now()})
    )


async def add_revision(session: AsyncSession, model: str, values: dict[str, Any]) -> None:
    await session.execute(
        insert(TrafficPolicyRevision).values(model=model, **values).on_conflict_do_nothing()
    )


async def policy_revision(
    session: AsyncSession, model: str, revision: int
) -> TrafficPolicyRevision | None:
    return await session.get(TrafficPolicyRevision, (model, revision))


async def policy_changes(
    session: AsyncSession, since: datetime, limit: int
) -> list[tuple[TrafficPolicyRevision, TrafficPolicyRevision | None]]:
    """The policy revisions written since `since` (at most `limit`, the newest), oldest
    first, each with the revision it replaced (None: the model's first)."""
    newest = (
        select(TrafficPolicyRevision)
        .where(TrafficPolicyRevision.created_at >= since)
        .order_by(TrafficPolicyRevision.created_at.desc(), TrafficPolicyRevision.revision.desc())
        .limit(limit)
    )
    changes = list(reversed(list(await session.scalars(newest))))
    wanted = {(c.model, c.revision - 1) for c in changes if c.revision > 1}
    before: dict[tuple[str, int], TrafficPolicyRevision] = {}
    if wanted:
        rows = await session.scalars(
            select(TrafficPolicyRevision).where(
                tuple_(TrafficPolicyRevision.model, TrafficPolicyRevision.revision).in_(wanted)
            )
        )
        before = {(r.model, r.revision): r for r in rows}
    return [(c, before.get((c.model, c.revision - 1))) for c in changes]


# -- pins ------------------------------------------------------------------------------------


async def all_pins(session: AsyncSession) -> list[tuple[uuid.UUID, str, str]]:
    """Every tenant's pins (routing needs them all)."""
    rows = await session.execute(
        text("SELECT tenant_id, model, version FROM sightline_model_pins()")
    )
    return [(r.tenant_id, r.model, r.version) for r in rows]


async def tenant_exists(session: AsyncSession, tenant_id: uuid.UUID) -> bool:
    """Tenants are not tenant-scoped: any unit of work reads them."""
    return await session.scalar(select(Tenant.id).where(Tenant.id == tenant_id)) is not None


async def pins(session: AsyncSession, model: str) -> Sequence[ModelPin]:
    """The pins of the unit of work's tenant."""
    return list(await session.scalars(select(ModelPin).where(ModelPin.model == model)))


async def pin(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    model: str,
    version: str,
    pinned_by: uuid.UUID | None,
) -> None:
    await session.execute(
        insert(ModelPin)
        .values(tenant_id=tenant_id, model=model, version=version, pinned_by=pinned_by)
        .on_conflict_do_update(
            index_elements=["tenant_id", "model"],
            set_={"version": version, "pinned_by": pinned_by, "created_at": func.now()},
        )
    )


async def unpin(session: AsyncSession, tenant_id: uuid.UUID, model: str) -> str | None:
    """Removes the tenant's pin; the version it pinned (None: there was none)."""
    return await session.scalar(
        delete(ModelPin)
        .where(ModelPin.tenant_id == tenant_id, ModelPin.model == model)
        .returning(ModelPin.version)
    )
