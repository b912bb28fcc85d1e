"""Root query fields."""

from __future__ import annotations

from datetime import UTC, datetime

import strawberry
from strawberry.types import Info

from backend import __version__
from backend.graphql.context import Context
from backend.graphql.types import Feature, ModelInfo, ServerInfo
from backend.inference.catalog import PACKAGED_MODELS


def _features(info: Info[Context, None]) -> list[Feature]:
    state = info.context.state
    settings = state.settings
    return [
        Feature(
            name="subscriptions.graphql-transport-ws",
            enabled=True,
            description="Subscriptions over WebSocket, graphql-transport-ws protocol.",
        ),
        Feature(
            name="subscriptions.graphql-ws",
            enabled=True,
            description="Subscriptions over WebSocket, legacy graphql-ws protocol.",
        ),
        Feature(
            name="database.embedded",
            enabled=state.embedded_database,
            description="PostgreSQL runs embedded in this server.",
        ),
        Feature(
            name="redis.embedded",
            enabled=state.embedded_redis,
            description="Valkey runs embedded in this server.",
        ),
        Feature(
            name="tracing.otlp",
            enabled=bool(settings.telemetry.otlp_endpoint),
            description="Traces are exported over OTLP.",
        ),
        Feature(
            name="metrics.prometheus",
            enabled=settings.telemetry.metrics_enabled,
            description="Prometheus metrics on /metrics.",
        ),
        Feature(name="chat", enabled=False, description="Streaming chat runs (not yet built)."),
        Feature(
            name="knowledge",
            enabled=False,
            description="Knowledge base and retrieval (not yet built).",
        ),
        Feature(
            name="vision",
            enabled=False,
            description="OCR, detection, classification (not yet built).",
        ),
    ]


@strawberry.type
class Query:
    @strawberry.field(description="Version, enabled features and packaged models of this server.")
    def server_info(self, info: Info[Context, None]) -> ServerInfo:
        state = info.context.state
        return ServerInfo(
            version=__version__,
            environment=state.settings.env.value,
            uptime_seconds=round(state.uptime_s, 3),
            server_time=datetime.now(UTC),
            features=_features(info),
            models=[
                ModelInfo(
                    name=model.name,
                    task=model.task.value,
                    version=model.version,
                    package=model.package,
                    installed=model.installed(),
                )
                for model in PACKAGED_MODELS
            ],
        )
