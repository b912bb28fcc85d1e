"""The database: migrations, pgvector, constraints, units of work, and test isolation itself."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backend.config import DatabaseSettings
from backend.core.db import Database
from backend.core.migrations import (
    alembic_config,
    current_revisions,
    head_revisions,
    is_current,
    schema_state,
    upgrade_to_head,
)
from backend.core.models import Tenant, User
from tests.conftest import empty_database


def tenant(slug: str | None = None) -> Tenant:
    return Tenant(slug=slug or f"t-{uuid.uuid4().hex[:10]}", name="Acme")


async def test_schema_is_at_head_with_pgvector(engine: AsyncEngine, db: Database) -> None:
    assert await is_current(engine)
    facts = await db.facts()
    assert facts.pgvector_installed is not None
    async with db.session() as session:
        distance = await session.scalar(text("SELECT '[1,0]'::vector <=> '[0,1]'::vector"))
    assert distance == pytest.approx(1.0)


async def test_migrations_apply_to_an_empty_database(engine: AsyncEngine) -> None:
    async with empty_database(engine) as fresh:
        assert await current_revisions(fresh) == frozenset()
        assert not await is_current(fresh)
        assert schema_state(frozenset()) == "behind"
        await upgrade_to_head(fresh)
        await upgrade_to_head(fresh)  # idempotent
        assert await current_revisions(fresh) == head_revisions()
        assert schema_state(await current_revisions(fresh)) == "current"
        async with fresh.begin() as conn:  # as if the next release's migrations had run
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999_next'"))
        assert schema_state(await current_revisions(fresh)) == "ahead"


async def test_unit_of_work_commits_or_rolls_back(db: Database) -> None:
    async with db.session() as session:
        session.add(kept := tenant())
    with pytest.raises(RuntimeError):
        async with db.session() as session:
            session.add(tenant("dropped-one"))
            await session.flush()
            raise RuntimeError("business rule failed")
    async with db.session() as session:
        slugs = set(await session.scalars(select(Tenant.slug)))
    assert kept.slug in slugs
    assert "dropped-one" not in slugs


async def _tenants(db: Database, count: int) -> list[Tenant]:
    async with db.session() as session:
        tenants = [tenant() for _ in range(count)]
        session.add_all(tenants)
    return tenants


async def test_user_email_is_unique_per_tenant_whatever_its_case(db: Database) -> None:
    acme, other = await _tenants(db, 2)
    async with db.session(acme.id) as session:
        session.add(User(tenant_id=acme.id, email="Ada@example.com"))
    async with db.session(other.id) as session:
        session.add(User(tenant_id=other.id, email="ada@example.com"))  # another tenant: fine
    with pytest.raises(IntegrityError):
        async with db.session(acme.id) as session:
            session.add(User(tenant_id=acme.id, email="ADA@example.com"))


async def test_deleting_a_tenant_deletes_its_users(db: Database) -> None:
    (acme,) = await _tenants(db, 1)
    async with db.session(acme.id) as session:
        session.add(User(tenant_id=acme.id, email="a@example.com"))
    async with db.session() as session:
        await session.execute(text("DELETE FROM tenants WHERE id = :id"), {"id": acme.id})
    async with db.session(acme.id) as session:
        count = await session.scalar(
            select(func.count()).select_from(User).where(User.tenant_id == acme.id)
        )
    assert count == 0


async def test_row_level_security_hides_other_tenants_rows(db: Database) -> None:
    """Isolation by PostgreSQL itself: a query with no tenant filter still sees one tenant."""
    acme, other = await _tenants(db, 2)
    for t in (acme, other):
        async with db.session(t.id) as session:
            session.add(User(tenant_id=t.id, email=f"someone@{t.slug}.example"))
    async with db.session(acme.id) as session:
        emails = set(await session.scalars(select(User.email)))  # no WHERE clause at all
        assert emails == {f"someone@{acme.slug}.example"}
        # Writing into another tenant is refused too.
        with pytest.raises(ProgrammingError, match="row-level security"):
            async with session.begin_nested():
                session.add(User(tenant_id=other.id, email="intruder@example.com"))
    async with db.session() as session:  # no tenant: no rows
        assert list(await session.scalars(select(User.email))) == []
    async with db.session(acme.id) as session:  # and the role cannot switch it off
        with pytest.raises(ProgrammingError):
            async with session.begin_nested():
                await session.execute(text("SET LOCAL row_security = off"))
                await session.execute(select(User.email))


async def test_a_tests_writes_are_rolled_back(engine: AsyncEngine) -> None:
    """The isolation every test relies on: what a test commits is gone after it."""
    slug = f"iso-{uuid.uuid4().hex[:8]}"
    async with engine.connect() as connection:
        transaction = await connection.begin()
        db = Database.bound_to(connection)
        async with db.session() as session:  # commits (into a savepoint)
            session.add(tenant(slug))
        async with db.session() as session:
            assert await session.scalar(select(Tenant.slug).where(Tenant.slug == slug)) == slug
        # Another connection cannot see the uncommitted outer transaction.
        async with engine.connect() as other:
            assert await other.scalar(select(Tenant.slug).where(Tenant.slug == slug)) is None
        await transaction.rollback()
    async with engine.connect() as after:
        assert await after.scalar(select(Tenant.slug).where(Tenant.slug == slug)) is None


async def test_every_tenant_table_has_row_level_security(engine: AsyncEngine) -> None:
    from backend.core.models import TENANT_TABLES

    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT relname, relrowsecurity FROM pg_class WHERE relname = ANY(:names)"),
            {"names": list(TENANT_TABLES)},
        )
        flags = dict(rows.all())
        policies = set(
            await conn.scalars(
                text("SELECT tablename FROM pg_policies WHERE policyname = 'tenant_isolation'")
            )
        )
    assert flags == dict.fromkeys(TENANT_TABLES, True)
    assert policies >= set(TENANT_TABLES)


def _migrate(connection: Connection, direction: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, direction)(config, revision)


async def test_bm25_lengths_migration_backfills_and_downgrades(engine: AsyncEngine) -> None:
    """0011 fills the chunk lengths (and documents' totals) of rows written before it, and
    goes back to 0010's text ranking."""
    async with empty_database(engine) as fresh:
        async with fresh.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "0010")
            tenant = await conn.scalar(
                text("INSERT INTO tenants (slug, name) VALUES ('bm25-migration', 'T') RETURNING id")
            )
            document = await conn.scalar(
                text(
                    "INSERT INTO documents (tenant_id, source, title, media_type, content_hash, "
                    "size_bytes, chunk_count, embedding_model) "
                    "VALUES (:t, 's', 'S', 'text/plain', 'h', 1, 2, 'm') RETURNING id"
                ),
                {"t": tenant},
            )
            for ord_, body in enumerate(["The cat sat on the cat mat.", "Dogs bark."]):
                await conn.execute(
                    text(
                        "INSERT INTO chunks (tenant_id, document_id, ord, text, embedding_model, "
                        "char_start, char_end, content_hash) "
                        "VALUES (:t, :d, :o, :x, 'm', 0, 1, 'h')"
                    ),
                    {"t": tenant, "d": document, "o": ord_, "x": body},
                )
        async with fresh.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "head")
            lengths = (await conn.execute(text("SELECT lexemes FROM chunks ORDER BY ord"))).all()
            # cat x2, sat, mat (stop words out) / dog, bark
            assert [r.lexemes for r in lengths] == [4, 2]
            assert await conn.scalar(text("SELECT lexemes FROM documents")) == 6
            columns = await conn.scalar(
                text("SELECT pg_get_function_result('sightline_match_chunks'::regproc)")
            )
            assert "lexemes" in columns
        async with fresh.begin() as conn:
            await conn.run_sync(_migrate, "downgrade", "0010")
            assert await current_revisions_of(conn) == frozenset({"0010"})
            left = await conn.scalar(
                text(
                    "SELECT count(*) FROM information_schema.columns "
                    "WHERE column_name = 'lexemes' AND table_name IN ('chunks', 'documents')"
                )
            )
            assert left == 0
            columns = await conn.scalar(
                text("SELECT pg_get_function_result('sightline_match_chunks'::regproc)")
            )
            assert "rank" in columns
        await upgrade_to_head(fresh)  # and up again
        assert await current_revisions(fresh) == head_revisions()


async def current_revisions_of(conn: AsyncConnection) -> frozenset[str]:
    return await conn.run_sync(
        lambda sync: frozenset(MigrationContext.configure(sync).get_current_heads())
    )


async def test_usage_by_model_migration_goes_up_and_down(engine: AsyncEngine) -> None:
    """0014 adds the model, version and kind of usage records (null on older rows) and
    0013 is what downgrading leaves."""
    columns = (
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'usage_records' AND column_name IN ('model', 'version', 'kind')"
    )
    async with empty_database(engine) as fresh:
        async with fresh.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "0013")
            tenant = await conn.scalar(
                text("INSERT INTO tenants (slug, name) VALUES ('usage-0014', 'T') RETURNING id")
            )
            await conn.execute(
                text(
                    "INSERT INTO usage_records (id, tenant_id, resource, subject, amount) "
                    "VALUES (gen_random_uuid(), :t, 'llm_tokens', 'run', 10)"
                ),
                {"t": tenant},
            )
        async with fresh.begin() as conn:
            await conn.run_sync(_migrate, "upgrade", "0014")
            assert set(await conn.scalars(text(columns))) == {"model", "version", "kind"}
            old = (await conn.execute(text("SELECT model, version, kind FROM usage_records"))).one()
            assert tuple(old) == (None, None, None)
        async with fresh.begin() as conn:
            await conn.run_sync(_migrate, "downgrade", "0013")
            assert await current_revisions_of(conn) == frozenset({"0013"})
            assert list(await conn.scalars(text(columns))) == []
            assert await conn.scalar(text("SELECT count(*) FROM usage_records")) == 1
        await upgrade_to_head(fresh)
        assert await current_revisions(fresh) == head_revisions()


async def test_a_pooled_connection_the_server_closed_is_replaced_without_an_error(
    database_url: str, engine: AsyncEngine
) -> None:
    """Checkouts are not pinged: the unit of work whose first statement finds its connection
    dead (the server restarted, or an operator ended it) runs it again on a new one."""
    db = Database.connect(database_url, DatabaseSettings(pool_size=1, max_overflow=0))
    try:
        async with db.session() as session:
            first = await session.scalar(text("SELECT pg_backend_pid()"))
        async with engine.connect() as admin:
            # waits (5 s at most) until the backend has gone
            assert await admin.scalar(text(f"SELECT pg_terminate_backend({int(first)}, 5000)"))
        async with db.session() as session:  # the only pooled connection is dead by now
            second = await session.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
        async with engine.connect() as admin:  # and the readiness probe's ping
            assert await admin.scalar(text(f"SELECT pg_terminate_backend({int(second)}, 5000)"))
        await db.ping(timeout_s=10)
    finally:
        await db.engine.dispose()
