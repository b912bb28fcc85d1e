"""BM25 text ranking: chunk lengths, document length totals, matches with their term data

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29

The text ranking scores its matches with BM25 (per-tenant document frequencies from
lexeme_stats, the chunk's term frequencies from its tsvector, length normalisation). That needs
each chunk's length in lexeme occurrences (`chunks.lexemes`, a stored generated column, so
existing rows are filled by the ALTER itself), and the tenant's average chunk length: the sum of
its chunks' lengths is kept per document (`documents.lexemes`, written by ingestion, backfilled
here), so the average is a sum over documents, not a scan of chunks.

sightline_match_chunks now returns each match's tsvector and length with its id (the ranking is
computed by the caller's query, in the same round trip): ts_rank_cd is gone.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MATCH_BODY = """
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
            SELECT c.id, {columns} FROM chunks c
            WHERE c.tsv @@ p_query
              AND c.tenant_id = sightline_current_tenant()
              AND c.embedding_model = p_model
              AND (p_meta IS NULL OR c.meta @> p_meta)
              AND (p_docs IS NULL OR c.document_id = ANY(p_docs))
            LIMIT p_max
        $$
"""
_ARGS = "p_query tsquery, p_model text, p_meta jsonb, p_docs uuid[], p_max integer"


def _match_function(returns: str, columns: str) -> None:
    op.execute("DROP FUNCTION IF EXISTS sightline_match_chunks")
    op.execute(
        f"CREATE FUNCTION sightline_match_chunks({_ARGS}) RETURNS TABLE ({returns})"
        + _MATCH_BODY.format(columns=columns)
    )
    op.execute("REVOKE ALL ON FUNCTION sightline_match_chunks FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION sightline_match_chunks TO sightline_app")


def upgrade() -> None:
    # How many lexeme occurrences a tsvector holds (a lexeme without positions counts once).
    op.execute("""
        CREATE FUNCTION sightline_tsvector_length(tsvector) RETURNS integer
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
            SELECT coalesce(sum(coalesce(array_length(positions, 1), 1)), 0)::integer
            FROM unnest($1)
        $$
    """)
    op.execute(
        "ALTER TABLE chunks ADD COLUMN lexemes integer GENERATED ALWAYS AS "
        "(sightline_tsvector_length(to_tsvector('english', text))) STORED"
    )
    op.add_column(
        "documents", sa.Column("lexemes", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.execute(
        "UPDATE documents d SET lexemes = coalesce("
        "(SELECT sum(c.lexemes) FROM chunks c WHERE c.document_id = d.id), 0)"
    )
    _match_function("id uuid, tsv tsvector, lexemes integer", "c.tsv, c.lexemes")


def downgrade() -> None:
    # the ranking of 0004, on the same matches
    op.execute("DROP FUNCTION IF EXISTS sightline_match_chunks")
    op.execute(
        f"CREATE FUNCTION sightline_match_chunks({_ARGS}) RETURNS TABLE (id uuid, rank real)"
        + """
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
        """
    )
    op.execute("REVOKE ALL ON FUNCTION sightline_match_chunks FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION sightline_match_chunks TO sightline_app")
    op.drop_column("documents", "lexemes")
    op.drop_column("chunks", "lexemes")
    op.execute("DROP FUNCTION sightline_tsvector_length(tsvector)")
