"""Image analysis jobs and their results (per task, with the model that produced them), and
the image of each job while it runs."""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import String
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import Field

from backend.core.models.base import (
    Base,
    Timestamps,
    UUIDKey,
    by_tenant_and_age,
    json_object,
    tenant_key,
    unfinished,
    user_ref,
    written_at,
)


class VisionStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class VisionJob(UUIDKey, Timestamps, table=True):
    __tablename__ = "vision_jobs"
    __table_args__ = (
        by_tenant_and_age("vision_jobs"),
        unfinished("vision_jobs", VisionStatus.QUEUED, VisionStatus.RUNNING),  # (0010)
    )

    tenant_id: uuid.UUID = tenant_key()
    created_by: uuid.UUID | None = user_ref(index=True)  # erasures (0008)
    status: str = Field(sa_type=String(20))
    tasks: list[str] = Field(sa_type=ARRAY(String(20)))
    media_type: str = Field(sa_type=String(50))
    width: int
    height: int
    size_bytes: int
    sha256: str = Field(sa_type=String(64))
    # {"ocr": {"model": ..., "version": ..., "ms": ..., "result": {...}} | {"error": ...}}
    results: dict[str, Any] = json_object()
    error_code: str | None = Field(default=None, sa_type=String(50))
    error: str | None = Field(default=None, sa_type=String(500))


class VisionUpload(Base, table=True):
    """The image a job analyses and what it was asked (`options`: models, language, top k),
    kept until the job ends: a replica that takes over the job of one that died reads it here."""

    __tablename__ = "vision_uploads"

    job_id: uuid.UUID = Field(foreign_key="vision_jobs.id", ondelete="CASCADE", primary_key=True)
    tenant_id: uuid.UUID = tenant_key(index=True)
    data: bytes
    options: dict[str, Any] = json_object()
    attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = written_at()
