"""The chat alias and version that served each run

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30

Chat aliases are registry models with versions (issue 17): a run records which alias and which
version of it served, so its cost, its statistics and its answer name the version. Both are
null on runs from before (their `model` column, the provider's model name, stays).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("model_alias", sa.String(length=100), nullable=True))
    op.add_column("runs", sa.Column("model_version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "model_version")
    op.drop_column("runs", "model_alias")
