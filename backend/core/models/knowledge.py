"""The knowledge base: documents, their chunks (embedding + full text), ingestion jobs."""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import BigInteger, Column, Computed, Index, Integer, String, Text
from sqlalchemy.dialects.postgresql import TSVECTOR
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

EMBEDDING_DIMENSIONS = 384


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"  # the embedding endpoint failed; the job waits and tries again
    COMPLETED = "completed"
    UNCHANGED = "unchanged"  # same content as stored: nothing to do
    FAILED = "failed"


class Document(UUIDKey, Timestamps, table=True):
    __tablename__ = "documents"
    __table_args__ = (
        Index("ix_documents_tenant_source", "tenant_id", "source", unique=True),
        Index("ix_documents_tenant_updated", "tenant_id", "updated_at"),  # purges (0008)
    )

    tenant_id: uuid.UUID = tenant_key()
    source: str = Field(sa_type=String(500))  # file name or the caller's key
    title: str = Field(sa_type=String(500))
    media_type: str = Field(sa_type=String(100))
    content_hash: str = Field(sa_type=String(64))
    size_bytes: int = Field(sa_type=BigInteger)
    chunk_count: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    # the sum of its chunks' `lexemes` (kept by ingestion): the tenant's average chunk length
    # for BM25 is a sum over documents
    lexemes: int = Field(default=0, sa_type=BigInteger, sa_column_kwargs={"server_default": "0"})
    embedding_model: str = Field(sa_type=String(200))
    meta: dict[str, Any] = json_object()
    created_by: uuid.UUID | None = user_ref(index=True)  # erasures (0008)


class Chunk(UUIDKey, table=True):
    __tablename__ = "chunks"
    __table_args__ = (
        Index("ix_chunks_document_ord", "document_id", "ord", unique=True),
        Index("ix_chunks_tenant", "tenant_id"),
        # nearest neighbours by cosine distance
        Index(
            "ix_chunks_embedding",
            "embedding",
            postgresql_using="hnsw",
            postgresql_with={"m": 16, "ef_construction": 64},
            postgresql_ops={"embedding": "vector_cosine_ops"},
        ),
        # full text search; no pending list (migration 0007)
        Index(
            "ix_chunks_tsv", "tsv", postgresql_using="gin", postgresql_with={"fastupdate": "off"}
        ),
        # metadata filters (`meta @> ...`)
        Index(
            "ix_chunks_meta",
            "meta",
            postgresql_using="gin",
            postgresql_ops={"meta": "jsonb_path_ops"},
        ),
    )

    tenant_id: uuid.UUID = tenant_key()
    document_id: uuid.UUID = Field(foreign_key="documents.id", ondelete="CASCADE")
    ord: int
    text: str = Field(sa_type=Text)
    embedding: Any = Field(default=None, sa_column=Column(Vector(EMBEDDING_DIMENSIONS)))
    embedding_model: str = Field(sa_type=String(200))
    tsv: Any = Field(
        sa_column=Column(TSVECTOR, Computed("to_tsvector('english', text)", persisted=True)),
    )
    # lexeme occurrences in `tsv` (its length for BM25; migration 0011)
    lexemes: int = Field(
        sa_column=Column(
            Integer,
            Computed("sightline_tsvector_length(to_tsvector('english', text))", persisted=True),
        ),
    )
    heading: str = Field(default="", sa_type=Text, sa_column_kwargs={"server_default": ""})
    page: int | None = None
    char_start: int
    char_end: int
    content_hash: str = Field(sa_type=String(64))
    meta: dict[str, Any] = json_object()


class IngestionJob(UUIDKey, Timestamps, table=True):
    __tablename__ = "ingestion_jobs"
    __table_args__ = (
        by_tenant_and_age("ingestion_jobs"),
        unfinished("ingestion_jobs", JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RETRYING),
    )

    tenant_id: uuid.UUID = tenant_key()
    document_id: uuid.UUID | None = Field(
        default=None, foreign_key="documents.id", ondelete="SET NULL"
    )
    source: str = Field(sa_type=String(500))
    status: str = Field(sa_type=String(20))
    total: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    done: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    error_code: str | None = Field(default=None, sa_type=String(64))
    error: str | None = Field(default=None, sa_type=Text)
    created_by: uuid.UUID | None = user_ref(index=True)  # erasures (0008)


class IngestionUpload(Base, table=True):
    """The document a job ingests, kept until the job ends: a replica that takes over the job
    of one that died reads it from here."""

    __tablename__ = "ingestion_uploads"

    job_id: uuid.UUID = Field(foreign_key="ingestion_jobs.id", ondelete="CASCADE", primary_key=True)
    tenant_id: uuid.UUID = tenant_key(index=True)
    data: bytes
    content_hash: str = Field(sa_type=String(64))
    media_type: str = Field(sa_type=String(100))
    title: str | None = Field(default=None, sa_type=String(500))
    meta: dict[str, Any] = json_object()
    attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = written_at()


class LexemeStat(Base, table=True):
    """In how many of the tenant's chunks a lexeme occurs (kept by ingestion)."""

    __tablename__ = "lexeme_stats"

    tenant_id: uuid.UUID = tenant_key(primary_key=True)
    lexeme: str = Field(sa_type=Text, primary_key=True)
    ndoc: int
