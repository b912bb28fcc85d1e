"""The PostgreSQL engine, units of work, and DB spans on the trace."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from functools import lru_cache
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import Executable, event, text
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from backend.config import DatabaseSettings
from backend.errors import NotFound, ServiceUnavailable

_SPAN_KEY = "sightline.span"
_MAX_STATEMENT_CHARS = 2000
# An execution option: the statement gets no span (the tenant scope that opens every unit of
# work: one round trip that tells a trace nothing the unit's own statements do not).
UNTRACED = "sightline_untraced"
_UNTRACED_OPTIONS = {UNTRACED: True}
# Statements' span names and attributes, built once per statement text (SQLAlchemy hands the
# same compiled strings over and over; the bound keeps ad-hoc SQL from growing it forever).
_STATEMENT_CACHE_SIZE = 512


T = TypeVar("T")


class DatabaseUnreachable(RuntimeError):
    """PostgreSQL did not answer; the message is one line an operator can act on."""


async def _again_if_dead(step: Callable[[], Awaitable[T]]) -> T:
    """`step()`, once more when its first statement found its pooled connection dead (the
    server restarted, or an operator ended it). Checkouts are not pinged (a round trip per
    unit of work); SQLAlchemy has invalidated the pool's older connections by then, and
    nothing of the step ran before that statement."""
    try:
        return await step()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return await step()


def redacted(url: str) -> str:
    """The URL with its password hidden: the only form that may reach a log line."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class ServerFacts:
    version: str
    pgvector_installed: str | None
    pgvector_available: str | None


class Database:
    """Owns the async engine and hands out sessions (one unit of work each).

    Every unit of work runs as `app_role` (which cannot bypass row-level security) with
    `app.tenant_id` set for its transaction: tenant tables show only that tenant's rows, and
    none at all when no tenant is given.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        app_role: str = "",
    ) -> None:
        self.engine = engine
        self._sessions = sessions
        self._scope = text(
            "SELECT set_config('role', :role, true), set_config('app.tenant_id', :tenant, true)"
            if app_role
            else "SELECT set_config('app.tenant_id', :tenant, true)"
        )
        self._role = app_role
        # Sessions join a caller's transaction (tests): `alone` runs in one of them too.
        self._bound = False

    @classmethod
    def connect(
        cls,
        url: str,
        settings: DatabaseSettings,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> Database:
        """Builds the engine (no connection is opened until first use)."""
        server_settings = {"application_name": "sightline"}
        if settings.statement_timeout_ms:
            server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        engine = create_async_engine(
            url,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout_s,
            echo=settings.echo,
            # An error's text (logged, put on traces) never shows the statement's values:
            # they are what users wrote, and credentials' hashes.
            hide_parameters=True,
            connect_args={
                "timeout": settings.connect_timeout_s,
                "server_settings": server_settings,
            },
        )
        if tracer_provider is not None:
            instrument_engine(engine, tracer_provider)
        return cls(engine, async_sessionmaker(engine, expire_on_commit=False), settings.app_role)

    @classmethod
    def bound_to(cls, connection: AsyncConnection, app_role: str = "") -> Database:
        """Sessions joining `connection`'s open transaction through savepoints (test isolation)."""
        sessions = async_sessionmaker(
            bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        database = cls(connection.engine, sessions, app_role)
        database._bound = True
        return database

    @asynccontextmanager
    async def session(
        self, tenant_id: uuid.UUID | None = None, *, settings: Mapping[str, str] | None = None
    ) -> AsyncIterator[AsyncSession]:
        """One unit of work in `tenant_id`: commits when the block succeeds, else rolls back.

        `settings` are more transaction-local settings (`hnsw.ef_search`, say), set in the
        same round trip as the tenant."""
        params = {"tenant": str(tenant_id) if tenant_id else ""}
        if self._role:
            params["role"] = self._role
        scope = self._scope
        if settings:
            extra = []
            for i, (name, value) in enumerate(settings.items()):
                params[f"s{i}"], params[f"v{i}"] = name, value
                extra.append(f", set_config(:s{i}, :v{i}, true)")
            scope = text(str(self._scope) + "".join(extra))
        session = await self._scoped(scope, params)
        async with session:
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            await session.commit()

    async def alone(
        self, tenant_id: uuid.UUID, statement: Executable, params: Mapping[str, Any]
    ) -> Row[Any]:
        """The one row of `statement`, run as a transaction of its own in one round trip (no
        BEGIN or COMMIT of the client's). The statement sets the tenant's scope itself: it is
        given `:role` (empty: stay the login role) and `:tenant`, as a unit of work sets them
        (see sightline_start_turn). For a hot path's unit of work that fits one statement."""
        scoped = {**params, "role": self._role, "tenant": str(tenant_id)}
        if self._bound:
            async with self.session(tenant_id) as session:
                return (await session.execute(statement, scoped)).one()
        return await self._mapped(lambda: self._autocommit(statement, scoped))

    async def _autocommit(self, statement: Executable, params: Mapping[str, Any]) -> Row[Any]:
        conn = await self.engine.connect()
        try:
            # the driver's flag, no round trip; the pool puts it back on check-in
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return (await conn.execute(statement, dict(params))).one()
        finally:  # shielded, as `_begin` closes: the connection goes back to the pool
            await asyncio.shield(asyncio.create_task(conn.close()))

    async def _scoped(self, scope: Any, params: dict[str, str]) -> AsyncSession:
        """A session whose transaction has begun with the tenant's scope."""
        return await self._mapped(lambda: self._begin(scope, params))

    @staticmethod
    async def _mapped(step: Callable[[], Awaitable[T]]) -> T:
        """`step()` (its first statement retried on a dead pooled connection), with a busy
        pool or an absent server as SERVICE_UNAVAILABLE."""
        try:
            return await _again_if_dead(step)
        except PoolTimeout:
            # Every pooled connection stayed busy for pool_timeout_s: overload, not a bug.
            raise ServiceUnavailable("the database is busy; retry shortly", retryAfter=1) from None
        except OSError as exc:
            # The first statement opens the connection: the server is not there (a Unix
            # socket that is gone raises FileNotFoundError, a closed port a refusal).
            raise ServiceUnavailable(
                "the database is unavailable; retry shortly", retryAfter=1
            ) from exc

    async def _begin(self, scope: Any, params: dict[str, str]) -> AsyncSession:
        session = self._sessions()
        try:
            await session.execute(scope, params, execution_options=_UNTRACED_OPTIONS)
        except BaseException:
            # shielded, as AsyncSession's own exit does: a second cancellation must not leave
            # the connection checked out
            await asyncio.shield(asyncio.create_task(session.close()))
            raise
        return session

    async def get_owned(self, tenant_id: uuid.UUID, model: type[T], ident: Any, what: str) -> T:
        """A row of the tenant, or NOT_FOUND (row-level security hides other tenants' rows)."""
        async with self.session(tenant_id) as session:
            row = await session.get(model, ident)
        if row is None:
            raise NotFound(f"no such {what}", id=str(ident))
        return row

    async def update_owned(
        self, tenant_id: uuid.UUID, model: type[Any], ident: Any, **values: Any
    ) -> None:
        """Sets columns of one of the tenant's rows (enum values stored as their value) and
        its `updated_at`; a row that is gone is left alone."""
        async with self.session(tenant_id) as session:
            row = await session.get(model, ident)
            if row is None:
                return
            for name, value in values.items():
                setattr(row, name, value.value if isinstance(value, Enum) else value)
            row.updated_at = datetime.now(UTC)

    async def unfinished(
        self, kind: str, idle_s: float, limit: int = 500
    ) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID | None]]:
        """(tenant, id, user) of every tenant's unfinished work of a kind ("run", "ingestion",
        "vision") untouched for `idle_s`: what lease recovery checks for work with no lease."""
        async with self.session() as session:
            rows = await session.execute(
                text("SELECT tenant_id, id, user_id FROM sightline_unfinished_work(:k, :s, :n)"),
                {"k": kind, "s": idle_s, "n": limit},
            )
            return [(r.tenant_id, r.id, r.user_id) for r in rows]

    async def ping(self, timeout_s: float) -> None:
        """Raises DatabaseUnreachable unless `SELECT 1` answers within `timeout_s` (on a new
        connection when the pooled one died with a restarted server)."""
        try:
            async with asyncio.timeout(timeout_s):
                await _again_if_dead(self._select_one)
        except Exception as exc:  # any failure to answer is 'unreachable' to an operator
            where = redacted(self.engine.url.render_as_string(hide_password=False))
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DatabaseUnreachable(f"cannot reach PostgreSQL at {where}: {reason}") from exc

    async def _select_one(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def facts(self) -> ServerFacts:
        """Server version and the pgvector extension's installed and available versions."""
        async with self.engine.connect() as conn:
            version = (await conn.execute(text("SHOW server_version"))).scalar_one()
            row = (
                await conn.execute(
                    text(
                        "SELECT installed_version, default_version FROM pg_available_extensions"
                        " WHERE name = 'vector'"
                    )
                )
            ).first()
        return ServerFacts(
            version=str(version),
            pgvector_installed=row[0] if row else None,
            pgvector_available=row[1] if row else None,
        )

    async def dispose(self) -> None:
        await self.engine.dispose()


def instrument_engine(engine: AsyncEngine, tracer_provider: trace.TracerProvider) -> None:
    """A client span per statement, child of the traced work that runs it (an HTTP request,
    a GraphQL operation, a chat turn, a vision job).

    A statement outside any recording span (a readiness probe's, a periodic job's, a
    migration's, or any when tracing is off or the trace is sampled out) gets none: it would be
    a trace of one span, and its cost would be paid for nothing. Nor does the tenant scope that
    opens every unit of work (`UNTRACED`).
    """
    url = engine.url
    # Where every statement goes is the same for the whole engine: said once per export (the
    # instrumentation scope's attributes), not on each statement's span.
    tracer = tracer_provider.get_tracer(
        "sightline.db",
        attributes={
            "db.name": url.database or "",
            "server.address": url.host or url.query.get("host", "") or "",
        },
    )

    @lru_cache(maxsize=_STATEMENT_CACHE_SIZE)
    def described(statement: str) -> tuple[str, dict[str, Any]]:
        verb = statement.lstrip().split(" ", 1)[0].upper() or "SQL"
        return f"db {verb}", {
            "db.system": "postgresql",
            "db.statement": statement[:_MAX_STATEMENT_CHARS],
        }

    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, *_: Any
    ) -> None:
        if not trace.get_current_span().is_recording():
            return
        if context is not None and context.execution_options.get(UNTRACED):
            return
        name, attributes = described(statement)
        span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        conn.info.setdefault(_SPAN_KEY, []).append(span)

    def after(conn: Any, *_: Any) -> None:
        spans = conn.info.get(_SPAN_KEY)
        if spans:
            spans.pop().end()

    def failed(context: Any) -> None:
        spans = context.connection.info.get(_SPAN_KEY) if context.connection else None
        if spans:
            span = spans.pop()
            error = context.original_exception
            # The type and SQLSTATE, not the message: PostgreSQL quotes the offending values in
            # it ("invalid input syntax for type uuid: ..."; a unique key's values).
            span.add_event("exception", {"exception.type": type(error).__name__})
            sqlstate = getattr(error, "sqlstate", None) or getattr(
                getattr(error, "orig", None), "sqlstate", None
            )
            if sqlstate:
                span.set_attribute("db.response.status_code", str(sqlstate))
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.end()

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    event.listen(engine.sync_engine, "handle_error", failed)
