"""Usage records name the model version that consumed them

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30

Cost is money per tenant, model, version and kind (issue 18): a usage record says which model
(registry name), which version of it and which kind (chat, vision, embedding) it was consumed
by, so `usage(byModel: true)` can sum them. Null on records from before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("model", sa.String(length=100), nullable=True))
    op.add_column("usage_records", sa.Column("version", sa.String(length=64), nullable=True))
    op.add_column("usage_records", sa.Column("kind", sa.String(length=16), nullable=True))


def downgrade() -> None:
    op.drop_column("usage_records", "kind")
    op.drop_column("usage_records", "version")
    op.drop_column("usage_records", "model")
