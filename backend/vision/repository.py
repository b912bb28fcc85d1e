"""Queries of vision jobs: the steps of a job's life that must hold when another replica takes
the job over meanwhile (each leaves a job that has ended alone). All in the caller's unit of
work, in the job's tenant."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, cast, delete, func, literal, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from backend.core.models import VisionJob, VisionStatus, VisionUpload

GOING = (VisionStatus.QUEUED.value, VisionStatus.RUNNING.value)


async def add_job(
    session: AsyncSession, job: VisionJob, data: bytes, options: dict[str, Any]
) -> None:
    """The job and its image (with what it was asked), accepted together."""
    session.add(job)
    await session.flush()
    session.add(
        VisionUpload(job_id=job.id, tenant_id=job.tenant_id, data=data, options=options, attempts=1)
    )
    await session.flush()


async def locked(session: AsyncSession, job_id: uuid.UUID) -> VisionJob | None:
    return await session.get(VisionJob, job_id, with_for_update=True, populate_existing=True)


async def locked_upload(session: AsyncSession, job_id: uuid.UUID) -> VisionUpload | None:
    return await session.get(VisionUpload, job_id, with_for_update=True)


async def begin(session: AsyncSession, job_id: uuid.UUID) -> bool:
    """Marks a going job RUNNING; False when it has ended (or is gone)."""
    changed = await session.execute(
        update(VisionJob)
        .where(VisionJob.id == job_id, VisionJob.status.in_(GOING))
        .values(status=VisionStatus.RUNNING.value, updated_at=datetime.now(UTC))
        .returning(VisionJob.id)
    )
    return changed.first() is not None


async def add_result(
    session: AsyncSession, job_id: uuid.UUID, task: str, entry: dict[str, Any]
) -> bool:
    """Stores one task's result in a going job (merged in one statement, so tasks that end at
    once keep each other's); False when the job has ended (or is gone)."""
    one = func.jsonb_build_object(cast(literal(task), Text), literal(entry, JSONB))
    merged = VisionJob.results.op("||")(one)
    changed = await session.execute(
        update(VisionJob)
        .where(VisionJob.id == job_id, VisionJob.status.in_(GOING))
        .values(results=merged, updated_at=datetime.now(UTC))
        .returning(VisionJob.id)
    )
    return changed.first() is not None


async def drop_upload(session: AsyncSession, job_id: uuid.UUID) -> None:
    await session.execute(delete(VisionUpload).where(VisionUpload.job_id == job_id))
