"""Drift snapshots: each comparison of a model version's current window with its reference

Revision ID: 0015
Revises: 0013
Create Date: 2026-11-30

Every interval one replica compares each served version's current window of every signal with
its reference (issue 18) and keeps the result here: `modelDrift`'s history. A platform table
(no tenant): drift is a model's, not a tenant's. Not tied to the registry by a key: Tesseract
drifts too, and the history outlives a retired version.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_snapshots",
        sa.Column("id", sa.Uuid(), server_default=sa.func.gen_random_uuid(), primary_key=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("exceeded", sa.Boolean(), nullable=False),
        sa.Column("signals", postgresql.JSONB(), server_default="[]", nullable=False),
    )
    op.create_index(
        "ix_drift_snapshots_model_version_at", "drift_snapshots", ["model", "version", "at"]
    )
    op.create_index(op.f("ix_drift_snapshots_at"), "drift_snapshots", ["at"])


def downgrade() -> None:
    op.drop_table("drift_snapshots")
