"""Text matching takes the question's rarest words first: at scale the capped match keeps the
passages that carry them

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03

The text ranking scores at most `text_max_matches` of the chunks that match the question's rare
words (one tsquery, their OR). sightline_match_chunks took whichever matches GIN gave first:
in a large knowledge base a word in a few percent of the chunks fills the cap, and which
passages are scored is the table's physical order, not the words they carry (the Perl FAQ among
100,000 other chunks: its own passages were cut off and TEXT nDCG@10 fell from 0.659 to about
0.07). sightline_match_chunks stays, unused, for a downgrade.

sightline_match_terms takes the words one at a time, rarest first (the caller orders them by
document frequency), each adding its chunks not yet taken until the cap is reached: a chunk
with the question's rarest word is always scored before one with only commoner words, and the
words after the cap is reached are not looked up. Under the cap it returns the same chunks as
the one tsquery did. Same security as sightline_match_chunks (SECURITY DEFINER: under row-level
security `@@` cannot use GIN; the tenant is checked explicitly).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "sightline_app"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION sightline_match_terms(
            p_terms text[], p_model text, p_meta jsonb, p_docs uuid[], p_max integer
        ) RETURNS TABLE (id uuid, tsv tsvector, lexemes integer)
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public AS $$
        DECLARE
            term text;
            word tsquery;
            taken tsquery := NULL;
            room integer := p_max;
            found integer;
        BEGIN
            IF p_terms IS NULL THEN
                RETURN;
            END IF;
            FOREACH term IN ARRAY p_terms LOOP
                EXIT WHEN room <= 0;
                word := to_tsquery('simple', quote_literal(term));
                RETURN QUERY
                    SELECT c.id, c.tsv, c.lexemes FROM chunks c
                    WHERE c.tsv @@ word
                      AND (taken IS NULL OR NOT c.tsv @@ taken)
                      AND c.tenant_id = sightline_current_tenant()
                      AND (c.embedding_model = p_model OR c.embedding_b_model = p_model)
                      AND (p_meta IS NULL OR c.meta @> p_meta)
                      AND (p_docs IS NULL OR c.document_id = ANY(p_docs))
                    LIMIT room;
                GET DIAGNOSTICS found = ROW_COUNT;
                room := room - found;
                taken := CASE WHEN taken IS NULL THEN word ELSE taken || word END;
            END LOOP;
        END
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION sightline_match_terms FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION sightline_match_terms TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS sightline_match_terms")
