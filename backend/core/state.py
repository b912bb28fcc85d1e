"""The stateful clients one app instance owns, opened and closed by its lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Self

from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio import Redis

from backend.config import Settings
from backend.core.db import Database, redacted
from backend.core.embedded import ResolvedServices, resolve_services
from backend.core.metrics import Metrics
from backend.core.migrations import current_revisions, schema_state, upgrade_to_head
from backend.core.redis import KeySpace, connect_redis, ping_redis

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    db: Database
    redis: Redis
    keys: KeySpace
    metrics: Metrics
    tracer_provider: TracerProvider
    embedded_database: bool
    embedded_redis: bool
    started_at: float = field(default_factory=time.time)
    _services: ResolvedServices | None = None
    _owns_db: bool = True
    _owns_redis: bool = True

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        metrics: Metrics,
        tracer_provider: TracerProvider,
        db: Database | None = None,
        redis: Redis | None = None,
    ) -> Self:
        """Resolves embedded servers, connects, fails fast when a backing service is down.

        `db` and `redis` may be handed in (tests pass a database bound to a rolled-back
        transaction); the state then neither migrates nor closes them.
        """
        configured_db = settings.database.url.get_secret_value() if settings.database.url else None
        configured_redis = settings.redis.url.get_secret_value() if settings.redis.url else None
        services = await asyncio.to_thread(
            resolve_services,
            settings.data_dir,
            configured_db,
            configured_redis,
            want_database=db is None,
            want_redis=redis is None,
        )
        state: AppState | None = None
        try:
            owns_db = db is None
            if db is None:
                assert services.database_url is not None
                db = Database.connect(services.database_url, settings.database, tracer_provider)
            owns_redis = redis is None
            if redis is None:
                assert services.redis_url is not None
                redis = connect_redis(services.redis_url, settings.redis)
            state = cls(
                settings=settings,
                db=db,
                redis=redis,
                keys=KeySpace(settings.redis.key_prefix),
                metrics=metrics,
                tracer_provider=tracer_provider,
                embedded_database="postgresql" in services.embedded,
                embedded_redis="valkey" in services.embedded,
                _services=services,
                _owns_db=owns_db,
                _owns_redis=owns_redis,
            )
            await db.ping(settings.database.connect_timeout_s)
            await ping_redis(redis, settings.redis.connect_timeout_s)
            if owns_db:
                log.info(
                    "database %s",
                    redacted(db.engine.url.render_as_string(hide_password=False)),
                )
                if settings.should_migrate_on_start:
                    await upgrade_to_head(db.engine)
                elif (schema := schema_state(await current_revisions(db.engine))) != "current":
                    log.warning(
                        "database schema is %s the code%s",
                        schema,
                        ": run `sightline migrate`" if schema == "behind" else " (newer release)",
                    )
        except BaseException:
            if state is not None:
                await state.close()
            else:
                await asyncio.to_thread(services.stop)
            raise
        return state

    async def close(self) -> None:
        """Closes clients, then stops the embedded servers this state started."""
        if self._owns_redis:
            await self.redis.aclose()
        if self._owns_db:
            await self.db.dispose()
        if self._services is not None:
            await asyncio.to_thread(self._services.stop)
        self.tracer_provider.shutdown()

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started_at
