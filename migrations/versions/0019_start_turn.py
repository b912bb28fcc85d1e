"""A turn starts in one statement: the tenant's scope, the conversation's lock and the turn's
rows, as a transaction of its own

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03

sendMessage's unit of work was five round trips (BEGIN, the scope, the conversation's lock, the
turn's insert, COMMIT), about 8 ms of the first token at one stream on a calm machine, most of
it the client's per-statement work. sightline_start_turn does them in one statement, run
without BEGIN/COMMIT: it sets the role and tenant (local to its own transaction, so row-level
security applies as in any unit of work), locks the caller's conversation, and then inserts the
run and its user message as repository.insert_turn did. A function, not one SQL statement: in
READ COMMITTED each statement of a VOLATILE function takes a new snapshot, so the insert, which
follows the lock, sees every run and message committed before the lock was granted (in one
statement with the lock, a wait for it would leave the snapshot taken before the wait).

SECURITY INVOKER, no SET clause (a SET clause would not change what it does, and it runs as
the role it switches to): the login role calls it and must be able to switch to the app role,
as for every unit of work.

Returns one row: `owned` (false: no such conversation of that owner; nothing written), the
conversation's run still going (`busy`), and the new message's `seq` and `created_at` (NULL
when nothing was written: `p_reject_busy` and a run going).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION sightline_start_turn(
            p_role text, p_tenant text, p_conversation uuid, p_owner uuid, p_run uuid,
            p_model varchar, p_model_alias varchar, p_model_version varchar,
            p_now timestamptz, p_reject_busy boolean, p_message uuid, p_content text,
            p_meta jsonb
        ) RETURNS TABLE (owned boolean, busy uuid, seq integer, created_at timestamptz)
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            IF p_role <> '' THEN
                PERFORM set_config('role', p_role, true);
            END IF;
            PERFORM set_config('app.tenant_id', p_tenant, true);
            PERFORM 1 FROM conversations c
            WHERE c.id = p_conversation AND c.owner_id = p_owner
            FOR UPDATE;
            IF NOT FOUND THEN
                RETURN QUERY SELECT false, NULL::uuid, NULL::integer, NULL::timestamptz;
                RETURN;
            END IF;
            RETURN QUERY
            WITH state AS (
              SELECT (SELECT r.id FROM runs r
                      WHERE r.conversation_id = p_conversation
                        AND r.status IN ('queued', 'running') LIMIT 1) AS busy,
                     (SELECT coalesce(max(m.seq), 0) FROM messages m
                      WHERE m.conversation_id = p_conversation) AS last
            ), new_run AS (
              INSERT INTO runs (id, tenant_id, conversation_id, user_id, status, model,
                                model_alias, model_version, created_at, updated_at)
              SELECT p_run, CAST(p_tenant AS uuid), p_conversation, p_owner,
                     CAST(CASE WHEN state.busy IS NULL THEN 'running' ELSE 'queued' END
                          AS run_status),
                     p_model, p_model_alias, p_model_version, p_now, p_now
              FROM state WHERE state.busy IS NULL OR NOT p_reject_busy
              RETURNING runs.id
            ), touched AS (
              UPDATE conversations SET updated_at = p_now
              WHERE conversations.id = p_conversation AND EXISTS (SELECT FROM new_run)
            ), new_message AS (
              INSERT INTO messages (id, tenant_id, conversation_id, seq, role, author_id,
                                    content, complete, run_id, meta)
              SELECT p_message, CAST(p_tenant AS uuid), p_conversation, state.last + 1,
                     CAST('user' AS message_role), p_owner, p_content, true, new_run.id,
                     p_meta
              FROM state, new_run
              RETURNING messages.seq, messages.created_at
            )
            SELECT true, state.busy, new_message.seq, new_message.created_at
            FROM state LEFT JOIN new_message ON true;
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS sightline_start_turn")
