"""`modelComparison`: a model's live version and its candidates side by side (requests, errors,
latency, tokens or compute-seconds, cost) with the shadow's agreement with live."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import strawberry
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.errors import ServiceUnavailable
from backend.graphql.context import Context
from backend.graphql.permissions import HasScope
from backend.lifecycle import comparison
from backend.lifecycle.operations import ModelOperations
from backend.lifecycle.shadow import ShadowAgreement as Agreement

Part = TypeVar("Part")


def lifecycle_part(
    info: Info[Context, None], part: Callable[[ModelOperations], Part | None], unavailable: str
) -> Part:
    """One part of the model-operations service (comparisons, timelines, drift), or
    SERVICE_UNAVAILABLE saying `unavailable` when this server runs without it."""
    operations = info.context.services.lifecycle
    found = part(operations) if operations is not None else None
    if found is None:
        raise ServiceUnavailable(unavailable)
    return found


# Tenant admins, and platform operators (owners of SIGHTLINE_PRIVACY_OPERATOR_TENANT: they
# hold the admin scope of their tenant).
ADMIN = [HasScope(Scope.ADMIN)]

ModelVersionRole = strawberry.enum(comparison.Role, name="ModelVersionRole")


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@strawberry.type(description="The mean of one comparison over the pairs compared.")
class AgreementMetric:
    name: str = strawberry.field(
        description="`top1_agreement` (classification), `detection_f1` (IoU-matched boxes), "
        "`cer` (OCR: character error rate of the shadow's text against live's, 0 is the "
        "same), `similarity` (chat: cosine of the answers' embeddings), `top10_overlap` "
        "(embeddings), `decision_agreement`, `live_flagged`, `shadow_flagged` (guardrails: "
        "the share of messages both versions decide alike, and the share each flags)."
    )
    mean: float


@strawberry.type(description="How the shadow compared with live over the window.")
class ShadowAgreement:
    live_version: str
    compared: int = strawberry.field(description="Pairs of live and shadow results compared.")
    failed: int = strawberry.field(description="Shadow runs that failed or timed out.")
    skipped: int = strawberry.field(
        description="Sampled requests not mirrored: too many shadow runs at once."
    )
    metrics: list[AgreementMetric]
    live_latency_ms: float | None = strawberry.field(description="Mean over the pairs.")
    shadow_latency_ms: float | None = strawberry.field(description="Mean over the pairs.")

    @classmethod
    def of(cls, found: Agreement) -> ShadowAgreement:
        return cls(
            live_version=found.live_version,
            compared=found.compared,
            failed=found.failed,
            skipped=found.skipped,
            metrics=[AgreementMetric(name=n, mean=v) for n, v in sorted(found.metrics.items())],
            live_latency_ms=milliseconds(found.live_latency_s),
            shadow_latency_ms=milliseconds(found.shadow_latency_s),
        )


@strawberry.type(
    description="What one version of a model served over the window, on every replica."
)
class ModelVersionFigures:
    version: str
    role: ModelVersionRole  # type: ignore[valid-type]
    weight: float = strawberry.field(description="Percent of the traffic it gets (shadow: 0).")
    requests: int
    errors: int
    error_rate: float
    p50_ms: float | None = strawberry.field(description="Null when it served nothing.")
    p95_ms: float | None
    tokens: int = strawberry.field(description="Chat and embedding models.")
    compute_seconds: float = strawberry.field(description="Vision models.")
    cost: float
    shadow_agreement: ShadowAgreement | None = strawberry.field(
        description="The shadow version only."
    )

    @classmethod
    def of(cls, figures: comparison.VersionFigures) -> ModelVersionFigures:
        window = figures.window
        return cls(
            version=window.version,
            role=figures.role,
            weight=figures.weight,
            requests=window.requests,
            errors=window.errors,
            error_rate=window.error_rate,
            p50_ms=milliseconds(window.p50_s),
            p95_ms=milliseconds(window.p95_s),
            tokens=window.tokens,
            compute_seconds=window.compute_s,
            cost=window.cost,
            shadow_agreement=(
                ShadowAgreement.of(figures.agreement) if figures.agreement is not None else None
            ),
        )


@strawberry.type(
    description="A model's versions side by side: live first, then candidates, then the shadow."
)
class ModelComparison:
    model: str
    window_seconds: float
    shadow_rate: float
    versions: list[ModelVersionFigures]


@strawberry.type
class ModelComparisonQuery:
    @strawberry.field(
        permission_classes=ADMIN,
        description="The live version of `model` and its candidates over the last `window` "
        "seconds (at most SIGHTLINE_LIFECYCLE_STATS_RETENTION_S), on every replica.",
    )
    async def model_comparison(
        self, info: Info[Context, None], model: str, window: float = 300.0
    ) -> ModelComparison:
        comparisons = lifecycle_part(
            info, lambda ops: ops.comparisons, "model comparison is not available on this server"
        )
        found = await comparisons.compare(model, window)
        return ModelComparison(
            model=found.model,
            window_seconds=found.window_s,
            shadow_rate=found.shadow_rate,
            versions=[ModelVersionFigures.of(v) for v in found.versions],
        )
