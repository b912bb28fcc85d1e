"""`modelDrift`: a model version's reference window, its latest comparison with the current
window and their history; pinning a reference window (operators)."""

from __future__ import annotations

from datetime import datetime

import strawberry
from strawberry.types import Info

from backend.auth.principal import Principal
from backend.graphql.context import Context
from backend.graphql.model_comparison import ADMIN, lifecycle_part
from backend.lifecycle import drift_watch


def _watch(info: Info[Context, None]) -> drift_watch.DriftWatch:
    return lifecycle_part(
        info, lambda ops: ops.drift_watch, "drift is off on this server (SIGHTLINE_DRIFT_ENABLED)"
    )


async def _operator(
    info: Info[Context, None], what: str
) -> tuple[Principal, drift_watch.DriftWatch]:
    """The caller, a platform operator (else NOT_OPERATOR, audited), and the drift watch."""
    principal = info.context.require_principal()
    watch = _watch(info)
    registry = info.context.services.registry
    assert registry is not None  # every app with services has one
    await registry.require_operator(principal, what)
    return principal, watch


@strawberry.type(description="The samples the current window is compared with.")
class DriftReference:
    pinned: bool = strawberry.field(
        description="An operator's window (`pinDriftReference`); false: the first samples the "
        "version served since it was promoted, or since it first served when it never was "
        "(SIGHTLINE_DRIFT_REFERENCE_SIZE of each signal)."
    )
    requests: int = strawberry.field(description="Samples of its largest signal.")
    since: datetime | None
    until: datetime | None = strawberry.field(description="Null while it is still filling.")

    @classmethod
    def of(cls, found: drift_watch.Reference) -> DriftReference:
        return cls(
            pinned=found.pinned, requests=found.requests, since=found.since, until=found.until
        )


@strawberry.type(description="One signal's drift: its thresholded statistic.")
class DriftSignal:
    name: str = strawberry.field(
        description="image_brightness, image_contrast, image_pixels, image_aspect, class, "
        "detections, detection_score, ocr_confidence, prompt_length, answer_length, refusal, "
        "guardrail_block, query_length, query_embedding, retrieval_top_score."
    )
    direction: str = strawberry.field(description='"input" or "output".')
    statistic: str = strawberry.field(
        description='"psi" (distributions) or "centroid" (the query embeddings\' cosine '
        "distance); ks, js and mmd are exported as metrics."
    )
    value: float
    threshold: float
    exceeded: bool

    @classmethod
    def of(cls, found: drift_watch.SignalDrift) -> DriftSignal:
        return cls(
            name=found.name,
            direction=found.direction,
            statistic=found.statistic,
            value=found.value,
            threshold=found.threshold,
            exceeded=found.exceeded,
        )


@strawberry.type(description="One comparison of the current window with the reference.")
class DriftSnapshot:
    at: datetime
    requests: int = strawberry.field(description="Samples of the current window's largest signal.")
    exceeded: bool = strawberry.field(description="Whether any signal is over its threshold.")
    signals: list[DriftSignal]

    @classmethod
    def of(cls, found: drift_watch.Snapshot) -> DriftSnapshot:
        return cls(
            at=found.at,
            requests=found.requests,
            exceeded=found.exceeded,
            signals=[DriftSignal.of(s) for s in found.signals],
        )


@strawberry.type(description="A model version's drift: its reference, now, and before.")
class ModelDrift:
    model: str
    version: str
    reference: DriftReference | None = strawberry.field(description="Null: no sample yet.")
    current: DriftSnapshot | None = strawberry.field(description="The latest comparison.")
    history: list[DriftSnapshot] = strawberry.field(description="Oldest first.")

    @classmethod
    def of(cls, found: drift_watch.DriftReport) -> ModelDrift:
        return cls(
            model=found.model,
            version=found.version,
            reference=DriftReference.of(found.reference) if found.reference else None,
            current=DriftSnapshot.of(found.current) if found.current else None,
            history=[DriftSnapshot.of(s) for s in found.history],
        )


@strawberry.type
class DriftQuery:
    @strawberry.field(
        permission_classes=ADMIN,
        description="Drift of `version` of `model` (null: the live one): its reference window, "
        "the latest comparison with the current window and up to `last` before it (at most "
        "SIGHTLINE_DRIFT_MAX_HISTORY).",
    )
    async def model_drift(
        self, info: Info[Context, None], model: str, version: str | None = None, last: int = 50
    ) -> ModelDrift:
        return ModelDrift.of(await _watch(info).report(model, version, last))


@strawberry.type
class DriftMutation:
    @strawberry.mutation(
        permission_classes=ADMIN,
        description="Makes the version's samples taken between `since` and `until` its drift "
        "reference (operators): among the latest SIGHTLINE_DRIFT_HISTORY_SIZE of each signal.",
    )
    async def pin_drift_reference(
        self,
        info: Info[Context, None],
        model: str,
        version: str,
        since: datetime,
        until: datetime,
    ) -> DriftReference:
        principal, watch = await _operator(info, "Mutation.pinDriftReference")
        return DriftReference.of(await watch.pin(principal, model, version, since, until))

    @strawberry.mutation(
        permission_classes=ADMIN,
        description="Back to the first samples the version served as its drift reference "
        "(operators); null while it has none.",
    )
    async def unpin_drift_reference(
        self, info: Info[Context, None], model: str, version: str
    ) -> DriftReference | None:
        principal, watch = await _operator(info, "Mutation.unpinDriftReference")
        found = await watch.unpin(principal, model, version)
        return DriftReference.of(found) if found else None
