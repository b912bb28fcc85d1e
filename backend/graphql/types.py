"""GraphQL object types of the platform itself (server facts, heartbeat)."""

from __future__ import annotations

from datetime import UTC, datetime

import strawberry
from strawberry.types import Info

from backend import __version__
from backend.core.state import AppState
from backend.graphql.evolution import API_VERSION
from backend.inference.catalog import PACKAGED_MODELS


@strawberry.type(description="A capability and whether this server has it switched on.")
class Feature:
    name: str
    enabled: bool
    description: str


@strawberry.type(description="A model this server can serve from an installed package.")
class ModelInfo:
    name: str
    task: str
    version: str
    package: str
    installed: bool


@strawberry.type(description="One tick of the heartbeat subscription.")
class Heartbeat:
    seq: int = strawberry.field(description="0 for the first tick, then +1 per tick.")
    at: datetime = strawberry.field(description="Server time of the tick (UTC).")


def state_has_llm(info: Info) -> bool:
    return bool(info.context.services.runs.models.aliases)


def _state(info: Info) -> AppState:
    return info.context.state  # type: ignore[no-any-return]


@strawberry.type(description="What this server is and what it can do.")
class ServerInfo:
    """Each field is computed only when selected."""

    @strawberry.field
    def version(self) -> str:
        return __version__

    @strawberry.field(
        description="The GraphQL API release this server serves, named by its date "
        "(YYYY-MM-DD, CHANGELOG.md): every operation valid against that release's schema "
        "works here, bar breaking changes the changelog announced. The schema grows between "
        "releases only by addition."
    )
    def api_version(self) -> str:
        return API_VERSION

    @strawberry.field
    def environment(self, info: Info) -> str:
        return _state(info).settings.env.value

    @strawberry.field
    def uptime_seconds(self, info: Info) -> float:
        return round(_state(info).uptime_s, 3)

    @strawberry.field
    def server_time(self) -> datetime:
        return datetime.now(UTC)

    @strawberry.field(description="The operators' Grafana dashboards, when configured.")
    def dashboards_url(self, info: Info) -> str | None:
        return _state(info).settings.server.dashboards_url

    @strawberry.field
    def features(self, info: Info) -> list[Feature]:
        """Derived from what this server runs, never from what is planned."""
        state = _state(info)
        telemetry = state.settings.telemetry
        services = info.context.services
        vision = services.vision
        vision_on = vision is not None and vision.enabled
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
                enabled=bool(telemetry.otlp_endpoint),
                description="Traces are exported over OTLP.",
            ),
            Feature(
                name="metrics.prometheus",
                enabled=telemetry.metrics_enabled,
                description="Prometheus metrics on /metrics.",
            ),
            Feature(
                name="auth",
                enabled=True,
                description="OAuth 2.0 tokens (Ed25519 JWT), API keys, row-level security.",
            ),
            Feature(
                name="limits",
                enabled=state.settings.limits.enabled,
                description="Rate limits and token/compute budgets across replicas.",
            ),
            Feature(
                name="chat",
                enabled=state_has_llm(info),
                description="Streaming chat runs (resumable, cancellable).",
            ),
            Feature(
                name="knowledge",
                enabled=True,
                description="Knowledge base: ingestion, hybrid search, cited answers.",
            ),
            Feature(
                name="knowledge.images",
                enabled=services.knowledge.read_image is not None,
                description="Images and scanned PDF pages are ingested through OCR.",
            ),
            Feature(
                name="vision",
                enabled=vision_on,
                description="Image analysis jobs (OCR, detection, classification) and live "
                "camera frames on the inference pool.",
            ),
            Feature(
                name="vision.ocr",
                enabled=vision_on and bool(vision and vision.ocr_languages()),
                description="OCR with the installed Tesseract language data.",
            ),
            Feature(
                name="guardrails",
                enabled=services.guardrails is not None,
                description="Input, retrieval, output and image rails on every turn.",
            ),
            Feature(
                name="auth.oidc",
                enabled=services.oidc is not None,
                description="Sign-in through an OpenID Connect provider.",
            ),
        ]

    @strawberry.field
    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=model.name,
                task=model.task.value,
                version=model.version,
                package=model.package,
                installed=model.installed(),
            )
            for model in PACKAGED_MODELS
        ]
