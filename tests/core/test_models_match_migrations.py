"""The tables as the models declare them are the tables the migrations make: Alembic's
autogenerate, run against a database migrated to head, finds nothing to write."""

from __future__ import annotations

import uuid
import warnings
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from backend.core.migrations import upgrade_to_head
from backend.core.models import Base


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"compare_type": True, "compare_server_default": True},
    )
    # Not compared, because autogenerate cannot see them (it reads tables, columns, indexes,
    # unique and foreign key constraints): the row-level security policies, the functions and
    # the role the migrations create with raw SQL. tests/core/test_db.py checks the policies.
    return compare_metadata(context, Base.metadata)


async def test_autogenerate_against_the_models_finds_nothing_to_migrate(
    engine: AsyncEngine,
) -> None:
    # A database of its own: nothing another test (or the chat checkpointer) created is in it.
    name = f"autogen_{uuid.uuid4().hex[:8]}"
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = create_async_engine(engine.url.set(database=name))
    try:
        await upgrade_to_head(fresh)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with fresh.connect() as conn:
                differences = await conn.run_sync(_differences)
    finally:
        await fresh.dispose()
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    assert differences == []
    # Autogenerate warns (rather than reports) what it skipped: nothing may be skipped.
    assert [str(w.message) for w in caught] == []
