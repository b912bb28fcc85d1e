"""the images of vision jobs, kept until each job ends; unfinished vision jobs found too

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

A vision job whose replica dies is run again by another replica, from the image stored with the
job (with what the job was asked: models, language, top k) in the transaction that accepts it,
and deleted in the one that ends it. Its size is bounded by SIGHTLINE_VISION_MAX_IMAGE_BYTES,
checked before anything is stored.

sightline_unfinished_work (0009) also answers for kind 'vision': the ids of vision jobs of every
tenant that are not finished and untouched for a while (lease recovery ends or resumes those
whose lease Redis lost).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNS_AND_INGESTION = """
    (SELECT r.tenant_id, r.id, r.user_id FROM runs r
     WHERE p_kind = 'run' AND r.status IN ('queued', 'running')
       AND r.updated_at < now() - make_interval(secs => p_idle_s)
     ORDER BY r.updated_at LIMIT p_limit)
    UNION ALL
    (SELECT j.tenant_id, j.id, j.created_by FROM ingestion_jobs j
     WHERE p_kind = 'ingestion' AND j.status IN ('queued', 'running', 'retrying')
       AND j.updated_at < now() - make_interval(secs => p_idle_s)
     ORDER BY j.updated_at LIMIT p_limit)"""

_VISION = """
    UNION ALL
    (SELECT v.tenant_id, v.id, v.created_by FROM vision_jobs v
     WHERE p_kind = 'vision' AND v.status IN ('queued', 'running')
       AND v.updated_at < now() - make_interval(secs => p_idle_s)
     ORDER BY v.updated_at LIMIT p_limit)"""


def _unfinished_work(body: str) -> str:
    # Run as the tables' owner (row-level security would show the app role no rows without a
    # tenant); it returns ids only. CREATE OR REPLACE keeps the grant to the app role.
    return f"""
        CREATE OR REPLACE FUNCTION sightline_unfinished_work(
            p_kind text, p_idle_s double precision, p_limit integer
        ) RETURNS TABLE (tenant_id uuid, id uuid, user_id uuid)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$ {body} $$
    """


def upgrade() -> None:
    op.create_table(
        "vision_uploads",
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("vision_jobs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("options", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
    )
    op.create_index("ix_vision_uploads_tenant_id", "vision_uploads", ["tenant_id"])
    # Kept only while the job runs; images are compressed already.
    op.execute("ALTER TABLE vision_uploads ALTER COLUMN data SET STORAGE EXTERNAL")
    op.execute("ALTER TABLE vision_uploads ENABLE ROW LEVEL SECURITY")
    op.execute(
        "CREATE POLICY tenant_isolation ON vision_uploads "
        "USING (tenant_id = sightline_current_tenant()) "
        "WITH CHECK (tenant_id = sightline_current_tenant())"
    )
    op.execute(
        "CREATE INDEX ix_vision_jobs_unfinished ON vision_jobs (updated_at) "
        "WHERE status IN ('queued', 'running')"
    )
    op.execute(_unfinished_work(_RUNS_AND_INGESTION + _VISION))


def downgrade() -> None:
    op.execute(_unfinished_work(_RUNS_AND_INGESTION))
    op.execute("DROP INDEX ix_vision_jobs_unfinished")
    op.drop_table("vision_uploads")
