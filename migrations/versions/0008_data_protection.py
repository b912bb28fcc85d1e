"""data protection: privacy policies, erasure markers, indexes for purges and erasures

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

Retention purges delete by age inside one tenant, and erasures find a user's rows by the
columns that point at the user: both need an index each, or every batch scans a whole table
(and deleting a user makes PostgreSQL scan every table whose foreign key sets it to NULL).
Audit events of no tenant are invisible to the app role (row-level security); two functions
let it purge them by age and pseudonymise the e-mail address in them, nothing else.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "sightline_app"
INDEXES = (
    ("ix_messages_tenant_created", "messages", ["tenant_id", "created_at"]),
    ("ix_messages_author_id", "messages", ["author_id"]),
    ("ix_runs_tenant_created", "runs", ["tenant_id", "created_at"]),
    ("ix_runs_user_id", "runs", ["user_id"]),
    ("ix_documents_tenant_updated", "documents", ["tenant_id", "updated_at"]),
    ("ix_documents_created_by", "documents", ["created_by"]),
    ("ix_ingestion_jobs_created_by", "ingestion_jobs", ["created_by"]),
    ("ix_vision_jobs_created_by", "vision_jobs", ["created_by"]),
    ("ix_audit_events_tenant_created", "audit_events", ["tenant_id", "created_at"]),
    ("ix_audit_events_actor_id", "audit_events", ["actor_id"]),
    ("ix_usage_records_user_id", "usage_records", ["user_id"]),
    ("ix_oauth_clients_user_id", "oauth_clients", ["user_id"]),
)


def upgrade() -> None:
    op.create_table(
        "privacy_policies",
        sa.Column("tenant_id", sa.Uuid(), sa.ForeignKey("tenants.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("policy", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.Column("updated_by", sa.Uuid(), sa.ForeignKey("users.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
    )
    op.execute("ALTER TABLE privacy_policies ENABLE ROW LEVEL SECURITY")
    op.execute(
        "CREATE POLICY tenant_isolation ON privacy_policies "
        "USING (tenant_id = sightline_current_tenant()) "
        "WITH CHECK (tenant_id = sightline_current_tenant())"
    )
    for table in ("tenants", "users"):
        op.add_column(table, sa.Column("erasure_requested_at", sa.DateTime(timezone=True)))
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)

    op.execute("""
        CREATE FUNCTION sightline_purge_unscoped_audit(p_before timestamptz, p_limit integer)
        RETURNS integer
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS
        $$ WITH gone AS (
             DELETE FROM audit_events WHERE id IN (
               SELECT id FROM audit_events
               WHERE tenant_id IS NULL AND created_at < p_before
               ORDER BY created_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
             RETURNING 1)
           SELECT count(*)::integer FROM gone $$
    """)
    op.execute("""
        CREATE FUNCTION sightline_pseudonymise_unscoped_audit(
            p_email text, p_pseudonym text, p_limit integer)
        RETURNS integer
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS
        $$ WITH changed AS (
             UPDATE audit_events
             SET details = details || jsonb_build_object('email', p_pseudonym)
             WHERE id IN (
               SELECT id FROM audit_events
               WHERE tenant_id IS NULL AND lower(details->>'email') = lower(p_email)
               LIMIT p_limit FOR UPDATE SKIP LOCKED)
             RETURNING 1)
           SELECT count(*)::integer FROM changed $$
    """)
    for signature in (
        "sightline_purge_unscoped_audit(timestamptz, integer)",
        "sightline_pseudonymise_unscoped_audit(text, text, integer)",
    ):
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS sightline_pseudonymise_unscoped_audit(text, text, integer)")
    op.execute("DROP FUNCTION IF EXISTS sightline_purge_unscoped_audit(timestamptz, integer)")
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
    for table in ("users", "tenants"):
        op.drop_column(table, "erasure_requested_at")
    op.drop_table("privacy_policies")
