"""The tables as the models declare them are the tables the migrations make: Alembic's
autogenerate, run against a database migrated to head, finds nothing to write; and each index
the models declare is the index the migrations made, method, operator classes, storage
parameters and predicate included (which autogenerate does not compare)."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.schema import CreateIndex

from backend.core.migrations import upgrade_to_head
from backend.core.models import Base
from tests.conftest import empty_database


@pytest.fixture(scope="module")
async def migrated(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """A database of its own, migrated to head: nothing another test (or the chat
    checkpointer) created is in it."""
    async with empty_database(engine) as fresh:
        await upgrade_to_head(fresh)
        yield fresh


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return compare_metadata(context, Base.metadata)


async def test_autogenerate_against_the_models_finds_nothing_to_migrate(
    migrated: AsyncEngine,
) -> None:
    # What autogenerate does not read is not compared: the row-level security policies, the
    # functions, the role and grants, and the columns' storage (SET STORAGE EXTERNAL), all made
    # by raw SQL in the migrations. tests/core/test_db.py checks the policies.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with migrated.connect() as conn:
            differences = await conn.run_sync(_differences)
    assert differences == []
    # Autogenerate warns (rather than reports) what it could not compare: nothing may be.
    assert [str(w.message) for w in caught] == []


async def test_every_index_of_the_models_is_the_one_the_migrations_made(
    migrated: AsyncEngine,
) -> None:
    """Each model index, built beside the migrated one under another name, has the same
    definition (PostgreSQL's own rendering of both)."""
    async with migrated.connect() as conn:
        await conn.begin()
        for table in Base.metadata.sorted_tables:
            for index in table.indexes:
                assert index.name is not None
                ddl = str(CreateIndex(index).compile(dialect=conn.dialect))
                probe = ddl.replace(f"INDEX {index.name} ON", "INDEX probe ON", 1)
                await conn.execute(text(probe))
                made = await conn.scalar(text("SELECT pg_get_indexdef('probe'::regclass)"))
                existing = await conn.scalar(
                    text("SELECT pg_get_indexdef(to_regclass(:name))"), {"name": index.name}
                )
                assert made.replace(" probe ON", f" {index.name} ON", 1) == existing, index.name
                await conn.execute(text("DROP INDEX probe"))
        await conn.rollback()
