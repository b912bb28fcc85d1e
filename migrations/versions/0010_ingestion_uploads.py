"""the uploads of ingestion jobs, kept until each job ends (tenant-isolated)

Revision ID: 0010
Revises: 0007
Create Date: 2026-11-30

A job whose replica dies is resumed by another replica: the document it was ingesting must be
where every replica can read it. It is stored with the job, in the transaction that accepts the
job (so an accepted document is never lost), and deleted in the one that ends it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0007"
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


def downgrade() -> None:
    op.drop_table("ingestion_uploads")
