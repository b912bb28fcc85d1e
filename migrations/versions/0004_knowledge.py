"""documents, chunks (vector + full text), ingestion jobs (tenant-isolated)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("documents", "chunks", "ingestion_jobs", "lexeme_stats")
DIMENSIONS = 384


def _id() -> sa.Column:
    return sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"),
                     primary_key=True)


def _tenant() -> sa.Column:
    return sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                     nullable=False)


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "documents", _id(), _tenant(),
        sa.Column("source", sa.String(500), nullable=False),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("media_type", sa.String(100), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("embedding_model", sa.String(200), nullable=False),
        sa.Column("meta", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("created_by", sa.Uuid(), sa.ForeignKey("users.id", ondelete="SET NULL")),
        *_timestamps(),
    )
    op.create_index("ix_documents_tenant_source", "documents", ["tenant_id", "source"],
                    unique=True)
    op.create_table(
        "chunks", _id(), _tenant(),
        sa.Column("document_id", sa.Uuid(), sa.ForeignKey("documents.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("ord", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("embedding", Vector(DIMENSIONS)),
        sa.Column("embedding_model", sa.String(200), nullable=False),
        sa.Column("tsv", postgresql.TSVECTOR(),
                  sa.Computed("to_tsvector('english', text)", persisted=True)),
        sa.Column("heading", sa.Text(), server_default="", nullable=False),
        sa.Column("page", sa.Integer()),
        sa.Column("char_start", sa.Integer(), nullable=False),
        sa.Column("char_end", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("meta", postgresql.JSONB(), server_default="{}", nullable=False),
    )
    op.create_index("ix_chunks_document_ord", "chunks", ["document_id", "ord"], unique=True)
    op.create_index("ix_chunks_tenant", "chunks", ["tenant_id"])
    op.execute(
        "CREATE INDEX ix_chunks_embedding ON chunks "
        "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )
    op.execute("CREATE INDEX ix_chunks_tsv ON chunks USING gin (tsv)")
    op.execute("CREATE INDEX ix_chunks_meta ON chunks USING gin (meta jsonb_path_ops)")
    op.create_table(
        "ingestion_jobs", _id(), _tenant(),
        sa.Column("document_id", sa.Uuid(), sa.ForeignKey("documents.id", ondelete="SET NULL")),
        sa.Column("source", sa.String(500), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error", sa.Text()),
        sa.Column("created_by", sa.Uuid(), sa.ForeignKey("users.id", ondelete="SET NULL")),
        *_timestamps(),
    )
    op.create_index("ix_ingestion_jobs_tenant_created", "ingestion_jobs",
                    ["tenant_id", "created_at"])
    # In how many chunks of the tenant each lexeme occurs: the text ranking leaves out words
    # too common to tell passages apart (ts_rank_cd has no IDF of its own).
    op.create_table(
        "lexeme_stats", _tenant(),
        sa.Column("lexeme", sa.Text(), nullable=False),
        sa.Column("ndoc", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "lexeme"),
    )
    # Full-text matching under row-level security cannot use the GIN index: `@@` is not
    # leakproof, so PostgreSQL checks the policy first, row by row. This function (run as the
    # table owner) restricts to the caller's tenant itself, from the same per-transaction
    # setting the policies read, and lets the index find the matches. Nothing else is exposed.
    op.execute("""
        CREATE FUNCTION sightline_match_chunks(
            p_query tsquery, p_model text, p_meta jsonb, p_docs uuid[], p_max integer
        ) RETURNS TABLE (id uuid, rank real)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
            SELECT m.id, ts_rank_cd(m.tsv, p_query) FROM (
                SELECT c.id, c.tsv FROM chunks c
                WHERE c.tsv @@ p_query
                  AND c.tenant_id = sightline_current_tenant()
                  AND c.embedding_model = p_model
                  AND (p_meta IS NULL OR c.meta @> p_meta)
                  AND (p_docs IS NULL OR c.document_id = ANY(p_docs))
                LIMIT p_max
            ) m
        $$
    """)
    op.execute("REVOKE ALL ON FUNCTION sightline_match_chunks FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION sightline_match_chunks TO sightline_app")
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            "USING (tenant_id = sightline_current_tenant()) "
            "WITH CHECK (tenant_id = sightline_current_tenant())"
        )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS sightline_match_chunks")
    for table in reversed(TABLES):
        op.drop_table(table)
