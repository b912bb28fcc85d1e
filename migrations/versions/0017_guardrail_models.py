"""Guardrail models in the registry: the injection rail's learned head has versions

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01

A registry model's kind may now be `guardrail` (issue 23, item 5): the learned attack head's
versions (their weights are their spec) are registered, shadowed, canaried, promoted and rolled
back like the other models'.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ck_registry_models_kind_known"
KINDS = "kind IN ('vision', 'chat', 'embedding', 'guardrail')"
KINDS_BEFORE = "kind IN ('vision', 'chat', 'embedding')"


def upgrade() -> None:
    op.drop_constraint(op.f(_NAME), "registry_models", type_="check")
    op.create_check_constraint(op.f(_NAME), "registry_models", KINDS)


def downgrade() -> None:
    # a guardrail model's rows go first (its versions, policy and pins follow by cascade)
    op.execute("DELETE FROM registry_models WHERE kind = 'guardrail'")
    op.drop_constraint(op.f(_NAME), "registry_models", type_="check")
    op.create_check_constraint(op.f(_NAME), "registry_models", KINDS_BEFORE)
