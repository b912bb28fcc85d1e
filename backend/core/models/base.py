"""The tables' base: SQLModel classes on one metadata (with the naming convention the
migrations' constraints and indexes follow), UUID keys, timestamps, and the fields most
tables share.

A table is a `Base` subclass with `table=True` and an explicit `__tablename__`. A field's
Python type decides its NULL-ability (Optional: NULL-able, anything else: NOT NULL); `Field`
gives the SQL type where SQLModel's default would differ from the migrations (`sa_type`: a
`str` would be an unbounded VARCHAR), the server default, key, index and foreign key. A column
the database fills (a server default with no Python one) has no Python default either, so it
is left out of the INSERT as with any SQLAlchemy model. Columns `Field` cannot describe
(computed ones, pgvector's) are given whole through `sa_column`.
"""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import DateTime, Enum, Index, MetaData, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(SQLModel, registry=registry(metadata=MetaData(naming_convention=NAMING_CONVENTION))):
    """Every table's base: `Base.metadata` holds them all (Alembic's target)."""


TIMESTAMP = DateTime(timezone=True)


def pg_enum(cls: type[StrEnum], name: str) -> Enum:
    """A PostgreSQL enum type of the members' values."""
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e])


def by_tenant_and_age(table: str) -> Index:
    """A tenant's rows by creation time (listings, retention purges, budgets)."""
    return Index(f"ix_{table}_tenant_created", "tenant_id", "created_at")


def unfinished(table: str, *statuses: str) -> Index:
    """The rows recovery looks for, by last change: only those in `statuses` (a partial
    index, as small as the unfinished work whatever the size of the table)."""
    listed = ", ".join(f"'{status}'" for status in statuses)
    return Index(f"ix_{table}_unfinished", "updated_at", postgresql_where=f"status IN ({listed})")


def moment(*, index: bool = False) -> Any:
    """A `timestamptz` the row may hold (NULL until set)."""
    return Field(default=None, index=index, sa_type=TIMESTAMP)


def written_at(*, index: bool = False) -> Any:
    """When the row was written: filled by the database."""
    return Field(index=index, sa_type=TIMESTAMP, sa_column_kwargs={"server_default": func.now()})


def tenant_key(*, index: bool = False, primary_key: bool = False) -> Any:
    """The tenant the row belongs to (row-level security reads it): deleted with it."""
    return Field(foreign_key="tenants.id", ondelete="CASCADE", index=index, primary_key=primary_key)


def user_key(*, index: bool = False) -> Any:
    """The user the row belongs to: deleted with the user."""
    return Field(foreign_key="users.id", ondelete="CASCADE", index=index)


def user_ref(*, index: bool = False) -> Any:
    """A user the row names: NULL once the user is deleted."""
    return Field(default=None, foreign_key="users.id", ondelete="SET NULL", index=index)


def json_object() -> Any:
    """A JSONB object, `{}` unless given."""
    return Field(default_factory=dict, sa_type=JSONB, sa_column_kwargs={"server_default": "{}"})


class UUIDKey(Base):
    id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        primary_key=True,
        sa_column_kwargs={"server_default": func.gen_random_uuid()},
    )


class Timestamps(Base):
    created_at: datetime = written_at()
    updated_at: datetime = Field(
        sa_type=TIMESTAMP,
        sa_column_kwargs={"server_default": func.now(), "onupdate": func.now()},
    )
