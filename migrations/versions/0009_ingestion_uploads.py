"""the uploads of ingestion jobs, kept until each job ends; unfinished work found across tenants

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30

A job whose replica dies is resumed by another replica: the document it was ingesting must be
where every replica can read it. It is stored with the job, in the transaction that accepts the
job (so an accepted document is never lost), and deleted in the one that ends it.

Work is recovered through its lease in Redis. Work with no lease at all (Redis lost its data, or
the job predates job leases) is found by sightline_unfinished_work: the ids (nothing else) of
runs and jobs of every tenant that are not finished and untouched for a while. Partial indexes
keep that lookup small whatever the size of the tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ingestion_uploads",
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("ingestion_jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("media_type", sa.String(100), nullable=False),
        sa.Column("title", sa.String(500), nullable=True),
        sa.Column("meta", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
    )
    op.create_index("ix_ingestion_uploads_tenant_id", "ingestion_uploads", ["tenant_id"])
    # Kept only while the job runs: not worth compressing (PDFs and images hardly compress).
    op.execute("ALTER TABLE ingestion_uploads ALTER COLUMN data SET STORAGE EXTERNAL")
    op.execute("ALTER TABLE ingestion_uploads ENABLE ROW LEVEL SECURITY")
    op.execute(
        "CREATE POLICY tenant_isolation ON ingestion_uploads "
        "USING (tenant_id = sightline_current_tenant()) "
        "WITH CHECK (tenant_id = sightline_current_tenant())"
    )
    op.execute(
        "CREATE INDEX ix_runs_unfinished ON runs (updated_at) "
        "WHERE status IN ('queued', 'running')"
    )
    op.execute(
        "CREATE INDEX ix_ingestion_jobs_unfinished ON ingestion_jobs (updated_at) "
        "WHERE status IN ('queued', 'running', 'retrying')"
    )
    # Run as the tables' owner (row-level security would show the app role no rows without a
    # tenant); it returns ids only.
    op.execute("""
        CREATE FUNCTION sightline_unfinished_work(
            p_kind text, p_idle_s double precision, p_limit integer
        ) RETURNS TABLE (tenant_id uuid, id uuid, user_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
            (SELECT r.tenant_id, r.id, r.user_id FROM runs r
             WHERE p_kind = 'run' AND r.status IN ('queued', 'running')
               AND r.updated_at < now() - make_interval(secs => p_idle_s)
             ORDER BY r.updated_at LIMIT p_limit)
            UNION ALL
            (SELECT j.tenant_id, j.id, j.created_by FROM ingestion_jobs j
             WHERE p_kind = 'ingestion' AND j.status IN ('queued', 'running', 'retrying')
               AND j.updated_at < now() - make_interval(secs => p_idle_s)
             ORDER BY j.updated_at LIMIT p_limit)
        $$
    """)
    op.execute("GRANT EXECUTE ON FUNCTION sightline_unfinished_work TO sightline_app")


def downgrade() -> None:
    op.execute("DROP FUNCTION sightline_unfinished_work")
    op.execute("DROP INDEX ix_ingestion_jobs_unfinished")
    op.execute("DROP INDEX ix_runs_unfinished")
    op.drop_table("ingestion_uploads")
