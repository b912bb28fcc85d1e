"""model registry: models, versions, traffic policies and their revisions, tenant pins

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30

Platform tables (operators own them; any unit of work reads them), except model_pins, which
belong to a tenant (row-level security). Routing on every replica needs every tenant's pins:
sightline_model_pins() returns them all, nothing else (SECURITY DEFINER, as the credential
lookups of 0002). registry_revision is one row whose lock serialises registry changes and whose
number replicas compare to know they are current.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "sightline_app"
KINDS = "kind IN ('vision', 'chat', 'embedding')"
STATUSES = (
    "status IN ('registered', 'loading', 'ready', 'live', 'canary', 'shadow', 'failed', "
    "'retired')"
)
STICKY = "sticky IN ('user', 'tenant', 'conversation', 'none')"


def _model(primary_key: bool = False) -> sa.Column:
    return sa.Column("model", sa.String(100),
                     sa.ForeignKey("registry_models.name", ondelete="CASCADE"),
                     primary_key=primary_key, nullable=False)


def _user(name: str) -> sa.Column:
    return sa.Column(name, sa.Uuid(), sa.ForeignKey("users.id", ondelete="SET NULL"),
                     nullable=True, index=True)


def _at(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(),
                     nullable=False)


def _policy() -> list[sa.Column]:
    return [
        sa.Column("arms", postgresql.JSONB(), server_default="[]", nullable=False),
        sa.Column("sticky", sa.String(20), server_default="user", nullable=False),
        sa.Column("shadow", sa.String(64)),
        sa.Column("shadow_rate", sa.Float(), server_default="0", nullable=False),
        sa.Column("canary", postgresql.JSONB()),
    ]


def upgrade() -> None:
    op.create_table(
        "registry_models",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        _at("created_at"),
        _at("updated_at"),
        sa.CheckConstraint(KINDS, name=op.f("ck_registry_models_kind_known")),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), primary_key=True),
        _model(),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("spec", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("status", sa.String(20), server_default="registered", nullable=False),
        sa.Column("error", sa.String(2000)),
        _user("registered_by"),
        _at("registered_at"),
        sa.Column("notes", sa.String(2000), server_default="", nullable=False),
        _at("updated_at"),
        sa.UniqueConstraint("model", "version", name=op.f("uq_model_versions_model_version")),
        sa.CheckConstraint(STATUSES, name=op.f("ck_model_versions_status_known")),
    )
    op.create_table(
        "traffic_policies",
        _model(primary_key=True),
        *_policy(),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        _user("updated_by"),
        _at("created_at"),
        _at("updated_at"),
        sa.CheckConstraint(STICKY, name=op.f("ck_traffic_policies_sticky_known")),
    )
    op.create_table(
        "traffic_policy_revisions",
        _model(primary_key=True),
        sa.Column("revision", sa.Integer(), primary_key=True, nullable=False),
        *_policy(),
        sa.Column("previous_revision", sa.Integer()),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("reason", sa.String(500)),
        _user("changed_by"),
        _at("created_at"),
        sa.CheckConstraint(STICKY, name=op.f("ck_traffic_policy_revisions_sticky_known")),
    )
    op.create_table(
        "model_pins",
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                  primary_key=True),
        _model(primary_key=True),
        sa.Column("version", sa.String(64), nullable=False),
        _user("pinned_by"),
        _at("created_at"),
    )
    op.execute("ALTER TABLE model_pins ENABLE ROW LEVEL SECURITY")
    op.execute(
        "CREATE POLICY tenant_isolation ON model_pins "
        "USING (tenant_id = sightline_current_tenant()) "
        "WITH CHECK (tenant_id = sightline_current_tenant())"
    )
    op.create_table(
        "registry_revision",
        sa.Column("id", sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_registry_revision_one_row")),
    )
    op.execute("INSERT INTO registry_revision (id, revision) VALUES (1, 0)")

    op.execute("""
        CREATE FUNCTION sightline_model_pins()
        RETURNS TABLE (tenant_id uuid, model text, version text)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS
        $$ SELECT tenant_id, model, version FROM model_pins $$
    """)
    op.execute("REVOKE ALL ON FUNCTION sightline_model_pins() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION sightline_model_pins() TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS sightline_model_pins()")
    for table in ("registry_revision", "model_pins", "traffic_policy_revisions",
                  "traffic_policies", "model_versions", "registry_models"):
        op.drop_table(table)
