"""The knowledge base: documents, their chunks (embedding + full text), ingestion jobs."""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Computed,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import TSVECTOR
from sqlmodel import Field

from backend.core.models.base import (
    TIMESTAMP,
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
        # the second slot: a new embedding version fills it while search reads the first
        # (migration 0016)
        Index(
            "ix_chunks_embedding_b",
            "embedding_b",
            postgresql_using="hnsw",
            postgresql_with={"m": 16, "ef_construction": 64},
            postgresql_ops={"embedding_b": "vector_cosine_ops"},
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
    embedding_b: Any = Field(default=None, sa_column=Column(Vector(EMBEDDING_DIMENSIONS)))
    embedding_b_model: str | None = Field(default=None, sa_type=String(200), nullable=True)
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


class KnowledgeEmbedding(Base, table=True):
    """One embedding model's slots (migration 0016): which of the chunks' two vector columns
    search reads, the tag (`model@version`) of the vectors each holds, and the re-embedding
    that fills the other one after a promotion, with its progress. A platform table."""

    __tablename__ = "knowledge_embeddings"
    __table_args__ = (
        CheckConstraint("serving_slot IN (0, 1)", name="slot_known"),
        CheckConstraint(
            "status IS NULL OR status IN ('running', 'completed', 'failed', 'cancelled', 'ready')",
            name="status_known",
        ),
    )

    model: str = Field(sa_type=String(100), primary_key=True)
    serving_slot: int = Field(
        default=0, sa_type=SmallInteger, sa_column_kwargs={"server_default": "0"}
    )
    serving_version: str = Field(sa_type=String(64))
    slot0: str | None = Field(default=None, sa_type=String(200))
    slot1: str | None = Field(default=None, sa_type=String(200))
    status: str | None = Field(default=None, sa_type=String(16))
    target_version: str | None = Field(default=None, sa_type=String(64))
    done: int = Field(default=0, sa_type=BigInteger, sa_column_kwargs={"server_default": "0"})
    total: int = Field(default=0, sa_type=BigInteger, sa_column_kwargs={"server_default": "0"})
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime | None = Field(default=None, sa_type=TIMESTAMP)
    finished_at: datetime | None = Field(default=None, sa_type=TIMESTAMP)
    updated_at: datetime = Field(
        sa_type=TIMESTAMP,
        sa_column_kwargs={"server_default": func.now(), "onupdate": func.now()},
    )
