"""Embedding slots: a second vector column per chunk, so that a new embedding version fills one
while search keeps reading the other

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30

Promoting an embedding model's version (issue 17) re-embeds every chunk with it. Vectors of two
models never mix, so the new vectors go into the slot search does not read (`embedding_b`, or
`embedding` when b serves), each slot with its own HNSW index and its own model column; when
every chunk has a vector of the new version, one row's update makes that slot the serving one.
The old slot stays as it was until the next promotion, so a replica that has not heard of the
switch yet still finds what it searches for.

`knowledge_embeddings` is a platform table (no tenant: the embedder is the platform's), one row
per embedding model: which slot serves, what each slot holds, and the re-embedding under way
with its progress. The functions below read and write chunks across tenants for that one job
(SECURITY DEFINER, as sightline_unfinished_work): ids, texts and vectors, nothing else.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "sightline_app"
DIMENSIONS = 384

_MATCH_ARGS = "p_query tsquery, p_model text, p_meta jsonb, p_docs uuid[], p_max integer"


def _match_function(model_test: str) -> None:
    """sightline_match_chunks of 0011, with the model test given (one or both slots)."""
    op.execute("DROP FUNCTION IF EXISTS sightline_match_chunks")
    op.execute(
        f"CREATE FUNCTION sightline_match_chunks({_MATCH_ARGS}) "
        "RETURNS TABLE (id uuid, tsv tsvector, lexemes integer)"
        f"""
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
            SELECT c.id, c.tsv, c.lexemes FROM chunks c
            WHERE c.tsv @@ p_query
              AND c.tenant_id = sightline_current_tenant()
              AND {model_test}
              AND (p_meta IS NULL OR c.meta @> p_meta)
              AND (p_docs IS NULL OR c.document_id = ANY(p_docs))
            LIMIT p_max
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION sightline_match_chunks FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION sightline_match_chunks TO {APP_ROLE}")


def upgrade() -> None:
    op.execute(f"ALTER TABLE chunks ADD COLUMN embedding_b vector({DIMENSIONS})")
    op.add_column("chunks", sa.Column("embedding_b_model", sa.String(200), nullable=True))
    op.execute(
        "CREATE INDEX ix_chunks_embedding_b ON chunks "
        "USING hnsw (embedding_b vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )
    op.create_table(
        "knowledge_embeddings",
        sa.Column("model", sa.String(100), primary_key=True),  # the registry's model name
        sa.Column("serving_slot", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("serving_version", sa.String(64), nullable=False),
        sa.Column("slot0", sa.String(200), nullable=True),  # the tag chunks carry in slot 0
        sa.Column("slot1", sa.String(200), nullable=True),
        # the re-embedding: running, completed (switched), ready (a shadow's vectors
        # complete), failed, cancelled (none: never)
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("target_version", sa.String(64), nullable=True),
        sa.Column("done", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("total", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("serving_slot IN (0, 1)", name=op.f("ck_knowledge_embeddings_slot_known")),
        sa.CheckConstraint(
            "status IS NULL OR status IN ('running', 'completed', 'failed', 'cancelled', 'ready')",
            name=op.f("ck_knowledge_embeddings_status_known"),
        ),
    )
    _match_function("(c.embedding_model = p_model OR c.embedding_b_model = p_model)")
    # Chunks of every tenant whose slot lacks a vector of `p_tag` (with `p_other`: only those
    # whose other slot holds that tag), in id order after `p_after`; and how many there are.
    backlog = """
            WHERE (CASE WHEN p_slot = 0 THEN c.embedding_model ELSE c.embedding_b_model END)
                  IS DISTINCT FROM p_tag
              AND (p_other IS NULL
                   OR (CASE WHEN p_slot = 0 THEN c.embedding_b_model ELSE c.embedding_model END)
                      = p_other)"""
    op.execute(f"""
        CREATE FUNCTION sightline_embedding_backlog(
            p_slot integer, p_tag text, p_other text, p_after uuid, p_limit integer
        ) RETURNS TABLE (id uuid, tenant_id uuid, text text)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
            SELECT c.id, c.tenant_id, c.text FROM chunks c {backlog}
              AND (p_after IS NULL OR c.id > p_after)
            ORDER BY c.id LIMIT p_limit
        $$
    """)
    op.execute(f"""
        CREATE FUNCTION sightline_embedding_backlog_count(
            p_slot integer, p_tag text, p_other text
        ) RETURNS bigint
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
            SELECT count(*) FROM chunks c {backlog}
        $$
    """)
    # Stores vectors of `p_tag` in a slot; returns how many chunks took them (a deleted chunk
    # takes none).
    op.execute("""
        CREATE FUNCTION sightline_embedding_store(
            p_slot integer, p_tag text, p_ids uuid[], p_vectors text[]
        ) RETURNS integer
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
        DECLARE stored integer;
        BEGIN
            IF p_slot = 0 THEN
                UPDATE chunks c SET embedding = CAST(v.vec AS vector), embedding_model = p_tag
                FROM unnest(p_ids, p_vectors) AS v(id, vec) WHERE c.id = v.id;
            ELSE
                UPDATE chunks c SET embedding_b = CAST(v.vec AS vector), embedding_b_model = p_tag
                FROM unnest(p_ids, p_vectors) AS v(id, vec) WHERE c.id = v.id;
            END IF;
            GET DIAGNOSTICS stored = ROW_COUNT;
            RETURN stored;
        END
        $$
    """)
    # At the switch: every tenant's documents of the old tag are the new tag's.
    op.execute("""
        CREATE FUNCTION sightline_embedding_retag(p_old text, p_new text) RETURNS integer
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
        DECLARE changed integer;
        BEGIN
            UPDATE documents SET embedding_model = p_new WHERE embedding_model = p_old;
            GET DIAGNOSTICS changed = ROW_COUNT;
            RETURN changed;
        END
        $$
    """)
    for function in (
        "sightline_embedding_backlog",
        "sightline_embedding_backlog_count",
        "sightline_embedding_store",
        "sightline_embedding_retag",
    ):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    for function in (
        "sightline_embedding_retag",
        "sightline_embedding_store",
        "sightline_embedding_backlog_count",
        "sightline_embedding_backlog",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
    _match_function("c.embedding_model = p_model")
    op.drop_table("knowledge_embeddings")
    op.execute("DROP INDEX IF EXISTS ix_chunks_embedding_b")
    op.drop_column("chunks", "embedding_b_model")
    op.drop_column("chunks", "embedding_b")
