"""`operationsTimeline`: each served model version's figures per step over a window, typed
errors by code, and the registry's version events, for the demo page's operations view."""

from __future__ import annotations

from datetime import datetime

import strawberry
from strawberry.types import Info

from backend.graphql.context import Context
from backend.graphql.model_comparison import ADMIN, lifecycle_part, milliseconds
from backend.lifecycle import timeline
from backend.lifecycle.stats import VersionWindow


@strawberry.type(description="What one version served in one step (`at`: the step's start).")
class TimelinePoint:
    at: datetime
    requests: int
    errors: int
    p50_ms: float | None = strawberry.field(description="Null when it served nothing.")
    p95_ms: float | None
    tokens: int
    compute_seconds: float
    cost: float

    @classmethod
    def of(cls, at: datetime, window: VersionWindow) -> TimelinePoint:
        return cls(
            at=at,
            requests=window.requests,
            errors=window.errors,
            p50_ms=milliseconds(window.p50_s),
            p95_ms=milliseconds(window.p95_s),
            tokens=window.tokens,
            compute_seconds=window.compute_s,
            cost=window.cost,
        )


@strawberry.type(description="One model version's figures per step, oldest first.")
class ModelTimeline:
    model: str
    version: str
    kind: str = strawberry.field(description="vision, chat, embedding or guardrail.")
    status: str = strawberry.field(description="live, canary, shadow, ready...")
    points: list[TimelinePoint]


@strawberry.type
class CountPoint:
    at: datetime
    count: int


@strawberry.type(description="Typed errors of one code per step (every surface and replica).")
class ErrorTimeline:
    code: str
    points: list[CountPoint]


@strawberry.type(description="A registry change to a model version, to mark on the time axis.")
class VersionEvent:
    at: datetime
    model: str
    version: str
    event: str = strawberry.field(
        description="seed, promote, traffic, canary, canary_ramp, shadow, rollback, "
        "canary_rollback (the canary guard's)."
    )


@strawberry.type
class OperationsTimeline:
    window: int
    step: int
    models: list[ModelTimeline]
    errors: list[ErrorTimeline]
    version_events: list[VersionEvent]


@strawberry.type
class OperationsTimelineQuery:
    @strawberry.field(
        permission_classes=ADMIN,
        description="Every served model version's requests, errors, latency, tokens, compute "
        "and cost per `step` seconds over the last `window` seconds, with errors by code and "
        "version events. The window is at most SIGHTLINE_MODELS_STATS_RETENTION_S; the step a "
        "multiple of SIGHTLINE_MODELS_STATS_BUCKET_S; window / step at most "
        "SIGHTLINE_MODELS_TIMELINE_MAX_POINTS.",
    )
    async def operations_timeline(
        self, info: Info[Context, None], window: int = 3600, step: int = 60
    ) -> OperationsTimeline:
        timelines = lifecycle_part(
            info,
            lambda ops: ops.timelines,
            "the operations timeline is not available on this server",
        )
        found = await timelines.read(window, step)
        return OperationsTimeline(
            window=found.window_s,
            step=found.step_s,
            models=[_model(m) for m in found.models],
            errors=[
                ErrorTimeline(code=code, points=[CountPoint(at=a, count=n) for a, n in points])
                for code, points in found.errors.items()
            ],
            version_events=[
                VersionEvent(at=e.at, model=e.model, version=e.version, event=e.event)
                for e in found.events
            ],
        )


def _model(found: timeline.VersionTimeline) -> ModelTimeline:
    return ModelTimeline(
        model=found.model,
        version=found.version,
        kind=found.kind,
        status=found.status,
        points=[TimelinePoint.of(at, window) for at, window in found.points],
    )
