"""Automatic persisted queries (Apollo's APQ): clients send a query's SHA-256 instead of its text.

A hash the server has not seen answers PERSISTED_QUERY_NOT_FOUND; the client then sends the
text with its hash once, which is checked and kept in Redis (shared by every replica).
With Redis down, both are SERVICE_UNAVAILABLE (as every operation is then: rate limits live
there too), on every HTTP transport, streams included. The WebSocket protocols do not carry
the extension to the schema (their payload's query is required): APQ is an HTTP feature.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

from strawberry.extensions import SchemaExtension

from backend.errors import AppError, ValidationFailed, expected_error

MAX_QUERY_BYTES = 100_000


class PersistedQueryNotFound(AppError):
    code = "PERSISTED_QUERY_NOT_FOUND"
    status = 200  # clients retry with the text; this is part of the protocol, not a failure


class PersistedQueries(SchemaExtension):
    async def on_operation(self) -> AsyncIterator[None]:
        ctx = self.execution_context
        persisted = (ctx.operation_extensions or {}).get("persistedQuery")
        if isinstance(persisted, dict):
            await self._resolve(persisted)
        yield

    async def _resolve(self, persisted: dict[str, Any]) -> None:
        ctx = self.execution_context
        digest = persisted.get("sha256Hash")
        if persisted.get("version") != 1 or not isinstance(digest, str) or len(digest) != 64:
            raise ValidationFailed("unsupported persistedQuery extension", field="persistedQuery")
        digest = digest.lower()
        if ctx.query and hashlib.sha256(ctx.query.encode()).hexdigest() != digest:
            raise ValidationFailed(
                "persistedQuery hash does not match the query", field="persistedQuery"
            )
        try:
            await self._keep_or_load(digest)
        except AppError:
            raise
        except Exception as exc:
            # raised typed: Strawberry answers a hook's exception with its message and the
            # extensions it carries (the driver's message would name Redis's address)
            typed = expected_error(exc)
            if typed is None:
                raise
            raise typed from exc

    async def _keep_or_load(self, digest: str) -> None:
        ctx = self.execution_context
        state = ctx.context.state
        key = state.keys("apq", digest)
        if ctx.query:
            if len(ctx.query) <= MAX_QUERY_BYTES:
                ttl = state.settings.graphql.persisted_query_ttl_s
                await state.redis.set(key, ctx.query.encode(), ex=ttl)
            return
        stored = await state.redis.get(key)
        if stored is None:
            raise PersistedQueryNotFound("PersistedQueryNotFound")
        ctx.query = stored.decode()
