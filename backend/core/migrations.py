"""Alembic driven from code: apply pending migrations, and tell whether the database is current."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

# Serialises concurrent `migrate` calls (several replicas starting at once) inside PostgreSQL.
_MIGRATION_LOCK_ID = 0x5157_4C4E  # "SQLN"


def migrations_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


@cache
def head_revisions() -> frozenset[str]:
    """The revisions the code expects (read once: the scripts do not change while running)."""
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


@cache
def known_revisions() -> frozenset[str]:
    """Every revision the code has a script for (a database at another one is newer)."""
    scripts = ScriptDirectory.from_config(alembic_config())
    return frozenset(script.revision for script in scripts.walk_revisions())


def _upgrade(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Applies every pending migration in one transaction-holding connection."""
    before = await current_revisions(engine)
    async with engine.connect() as conn:
        await conn.run_sync(_upgrade)
        await conn.commit()
    after = await current_revisions(engine)
    if before != after:
        log.info(
            "migrated database from %s to %s",
            ",".join(sorted(before)) or "empty",
            ",".join(sorted(after)),
        )


def _current(connection: Connection) -> frozenset[str]:
    return frozenset(MigrationContext.configure(connection).get_current_heads())


async def current_revisions(engine: AsyncEngine) -> frozenset[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def is_current(engine: AsyncEngine) -> bool:
    return await current_revisions(engine) == head_revisions()


def schema_state(current: frozenset[str]) -> Literal["current", "behind", "ahead"]:
    """Where the database's revisions stand against the code's: `ahead` when it was migrated by
    newer code (a revision this code has no script for), as during a rolling upgrade after the
    new release's migrations ran; `behind` when this code's migrations are still to apply."""
    if current == head_revisions():
        return "current"
    if not current <= known_revisions():
        return "ahead"
    return "behind"
