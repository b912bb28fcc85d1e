"""The model registry in the schema: models with their versions, traffic policy and pins;
registering versions, setting policies, promoting, rolling back, retiring, pinning. Operators
(owners of the operator tenant) change it; tenant admins read it and pin versions for their
tenant."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.errors import ValidationFailed
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import HasScope, IsAuthenticated
from backend.knowledge.versions import Reembedding
from backend.lifecycle import policy as routing
from backend.lifecycle import schemas
from backend.lifecycle.service import KEEP, ModelRegistryService

log = logging.getLogger(__name__)

ADMIN = [HasScope(Scope.ADMIN)]
SIGNED_IN = [IsAuthenticated]

ModelKind = strawberry.enum(
    routing.ModelKind, name="ModelKind", description="What a registry model serves."
)
ModelVersionStatus = strawberry.enum(
    routing.VersionStatus,
    name="ModelVersionStatus",
    description="REGISTERED: known; LOADING: replicas load and warm it; READY: loaded "
    "everywhere, no traffic; LIVE, CANARY, SHADOW: its share of the traffic policy; FAILED: "
    "it did not load (`error` says why); RETIRED: unloaded, kept for the record.",
)
StickyKey = strawberry.enum(
    routing.StickyKey,
    name="StickyKey",
    description="What keeps a caller on one version across requests, replicas and restarts.",
)


def _service(info: Info[Context, None]) -> ModelRegistryService:
    service = info.context.services.registry
    assert service is not None  # every app with services has one
    return service


@strawberry.type(description="A version and its share of the traffic, in percent.")
class TrafficArm:
    version: str
    weight: float


@strawberry.type(
    name="CanaryGuard",
    description="When the canary's figures break these against live over the window (with "
    "at least minRequests on each side), the policy rolls back by itself.",
)
class CanaryGuardType:
    max_error_rate_delta: float
    max_p95_ratio: float
    min_requests: int
    window_s: float
    ramp: list[float] = strawberry.field(
        description="Canary weights, in percent, stepped up after each clean window (the last "
        "step, 100, promotes it); empty: the operator steps them."
    )


@strawberry.type(name="TrafficPolicy", description="How a model's requests are split.")
class TrafficPolicyType:
    model: str
    arms: list[TrafficArm]
    live: str = strawberry.field(description="The version with the most traffic.")
    sticky: StickyKey  # type: ignore[valid-type]
    shadow: str | None = strawberry.field(
        description="A version that also runs on a sample of requests, after the answer."
    )
    shadow_rate: float
    canary: CanaryGuardType | None
    revision: int = strawberry.field(description="Bumped by every change of the policy.")

    @classmethod
    def of(cls, policy: routing.TrafficPolicy) -> TrafficPolicyType:
        guard = policy.canary
        return cls(
            model=policy.model,
            arms=[TrafficArm(version=a.version, weight=a.weight) for a in policy.arms],
            live=policy.live,
            sticky=policy.sticky,
            shadow=policy.shadow,
            shadow_rate=policy.shadow_rate,
            canary=CanaryGuardType(
                max_error_rate_delta=guard.max_error_rate_delta,
                max_p95_ratio=guard.max_p95_ratio,
                min_requests=guard.min_requests,
                window_s=guard.window_s,
                ramp=list(guard.ramp),
            )
            if guard is not None
            else None,
            revision=policy.revision,
        )


@strawberry.type(description="One version of a registry model.")
class ModelVersion:
    model: str
    version: str
    status: ModelVersionStatus  # type: ignore[valid-type]
    spec: JSON = strawberry.field(
        description="The manifest (vision), the endpoint spec (chat, embedding) or the learned "
        "head (guardrail)."
    )
    sha256: str | None
    error: str | None
    notes: str
    registered_by: strawberry.ID | None
    registered_at: datetime | None

    @classmethod
    def of(cls, version: schemas.VersionDetails) -> ModelVersion:
        return cls(
            model=version.model,
            version=version.version,
            status=routing.VersionStatus(version.status),
            spec=version.spec,
            sha256=version.sha256,
            error=version.error,
            notes=version.notes,
            registered_by=strawberry.ID(str(version.registered_by))
            if version.registered_by
            else None,
            registered_at=version.registered_at,
        )


@strawberry.type(description="A tenant's pin: the tenant's requests to the model get this version.")
class ModelPin:
    tenant_id: strawberry.ID
    model: str
    version: str

    @classmethod
    def of(cls, pin: schemas.PinDetails) -> ModelPin:
        return cls(
            tenant_id=strawberry.ID(str(pin.tenant_id)), model=pin.model, version=pin.version
        )


@strawberry.type(
    description="The knowledge base's vectors of an embedding model: the version search uses, "
    "and the re-embedding a promotion starts (search keeps the serving version's vectors until "
    "every chunk has the new version's, then switches at once)."
)
class EmbeddingReembedding:
    serving_version: str = strawberry.field(description="The version search embeds with.")
    status: str | None = strawberry.field(
        description="The last re-embedding: running, completed (search switched to it), "
        "ready (a shadow version's vectors are complete: sampled searches are compared with "
        "it), failed, or cancelled (the promotion was undone first); null: there was none."
    )
    target_version: str | None
    done: int = strawberry.field(description="Chunks re-embedded so far.")
    total: int = strawberry.field(
        description="Chunks to re-embed, counted at the start (chunks ingested meanwhile are "
        "re-embedded too)."
    )
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, state: Reembedding) -> EmbeddingReembedding:
        return cls(
            serving_version=state.serving_version,
            status=state.status,
            target_version=state.target_version,
            done=state.done,
            total=state.total,
            error=state.error,
            started_at=state.started_at,
            finished_at=state.finished_at,
        )


@strawberry.type(
    description="A model the registry knows: a vision model, a chat alias or an embedding model."
)
class RegistryModel:
    name: str
    kind: ModelKind  # type: ignore[valid-type]
    task: str
    versions: list[ModelVersion]
    policy: TrafficPolicyType | None
    pins: list[ModelPin] = strawberry.field(
        description="Pins of the model: every tenant's for operators, the tenant's own for "
        "tenant admins."
    )

    @classmethod
    def of(cls, model: schemas.ModelDetails) -> RegistryModel:
        return cls(
            name=model.name,
            kind=model.kind,
            task=model.task,
            versions=[ModelVersion.of(v) for v in model.versions],
            policy=TrafficPolicyType.of(model.policy) if model.policy is not None else None,
            pins=[ModelPin.of(p) for p in model.pins],
        )

    @strawberry.field(
        description="The knowledge base's embedding model only: its serving version and "
        "re-embedding progress (null for other models)."
    )
    async def reembedding(self, info: Info[Context, None]) -> EmbeddingReembedding | None:
        versions = info.context.services.knowledge.versions
        if self.kind is not routing.ModelKind.EMBEDDING or versions.model != self.name:
            return None
        return EmbeddingReembedding.of(await versions.state())


@strawberry.input(description="A version and its share of the traffic, in percent.")
class TrafficArmInput:
    version: str
    weight: float


@strawberry.input(description="Canary guards; a field left out takes its default.")
class CanaryGuardInput:
    max_error_rate_delta: float = 0.05
    max_p95_ratio: float = 1.5
    min_requests: int = 50
    window_s: float = 300.0
    ramp: list[float] = strawberry.field(
        default_factory=list,
        description="Automatic ramp: the canary's weights in percent, going up (for example "
        "5, 25, 50, 100), each taken after a window within the guard; 100 promotes it.",
    )

    def guard(self) -> routing.CanaryGuard:
        return routing.CanaryGuard(
            max_error_rate_delta=self.max_error_rate_delta,
            max_p95_ratio=self.max_p95_ratio,
            min_requests=self.min_requests,
            window_s=self.window_s,
            ramp=tuple(self.ramp),
        )


async def _taken_in(info: Info[Context, None]) -> None:
    """Read-your-writes on the replica that made a routing change: its own registry view
    (routers, pools, the knowledge base's embedder) has the change before the answer, so the
    caller's next request here is routed by it. Other replicas follow over Redis within
    moments. Bounded: a slow re-read is left to the watcher (the change is committed)."""
    watcher = info.context.services.models_watcher
    if watcher is None:
        return
    try:
        await watcher.refresh()
    except Exception as exc:  # the watcher's own reconciling takes it in later
        log.warning("model registry: re-reading after a change failed: %r", exc)


def _kept(value: Any) -> Any:
    return KEEP if value is strawberry.UNSET else value


@strawberry.type
class RegistryQuery:
    @strawberry.field(permission_classes=ADMIN, description="Every model in the registry.")
    async def models(self, info: Info[Context, None]) -> list[RegistryModel]:
        found = await _service(info).models(info.context.require_principal())
        return [RegistryModel.of(m) for m in found]

    @strawberry.field(
        permission_classes=ADMIN, description="One registry model (MODEL_NOT_FOUND if unknown)."
    )
    async def model(self, info: Info[Context, None], name: str) -> RegistryModel:
        return RegistryModel.of(await _service(info).model(info.context.require_principal(), name))


@strawberry.type
class RegistryMutation:
    @strawberry.mutation(
        permission_classes=SIGNED_IN,
        description="Registers a model version (operators). A new model needs its kind (and a "
        "vision model its task). A vision version's files are checked against their sha256 "
        "(CHECKSUM_MISMATCH), then it loads on every replica: LOADING until all have it READY.",
    )
    async def register_model_version(
        self,
        info: Info[Context, None],
        *,
        model: str,
        version: str,
        spec: JSON,
        kind: ModelKind | None = None,  # type: ignore[valid-type]
        task: str | None = None,
        sha256: str | None = None,
        notes: str = "",
    ) -> ModelVersion:
        if not isinstance(spec, dict):
            raise ValidationFailed("spec must be a JSON object", field="spec")
        found = await _service(info).register_version(
            info.context.require_principal(),
            model,
            version,
            spec=spec,
            kind=kind,
            task=task,
            sha256=sha256,
            notes=notes,
        )
        return ModelVersion.of(found)

    @strawberry.mutation(
        permission_classes=SIGNED_IN,
        description="Replaces a model's traffic split (operators): weights in percent summing "
        "to 100, over versions ready on every replica. An argument left out keeps its value; "
        "null clears the shadow or the canary guard (and keeps sticky and shadowRate). A "
        "refused policy leaves the one in force unchanged.",
    )
    async def set_traffic_policy(
        self,
        info: Info[Context, None],
        *,
        model: str,
        arms: list[TrafficArmInput],
        sticky: StickyKey | None = strawberry.UNSET,  # type: ignore[valid-type]
        shadow: str | None = strawberry.UNSET,
        shadow_rate: float | None = strawberry.UNSET,
        canary: CanaryGuardInput | None = strawberry.UNSET,
        expected_revision: Annotated[
            int | None,
            strawberry.argument(
                description="Refused (STALE_TRAFFIC_POLICY) if the policy's revision differs."
            ),
        ] = None,
        reason: str | None = None,
    ) -> TrafficPolicyType:
        policy = await _service(info).set_traffic_policy(
            info.context.require_principal(),
            model,
            [routing.Arm(a.version, a.weight) for a in arms],
            sticky=KEEP if sticky in (strawberry.UNSET, None) else sticky,
            shadow=_kept(shadow),
            shadow_rate=KEEP if shadow_rate in (strawberry.UNSET, None) else shadow_rate,
            canary=_kept(canary.guard() if isinstance(canary, CanaryGuardInput) else canary),
            expected_revision=expected_revision,
            reason=reason,
        )
        await _taken_in(info)
        return TrafficPolicyType.of(policy)

    @strawberry.mutation(
        permission_classes=SIGNED_IN,
        description="Gives a ready version all the traffic (operators); the versions that had "
        "it stay loaded for a rollback.",
    )
    async def promote_model_version(
        self, info: Info[Context, None], model: str, version: str
    ) -> TrafficPolicyType:
        policy = await _service(info).promote_version(
            info.context.require_principal(), model, version
        )
        await _taken_in(info)
        return TrafficPolicyType.of(policy)

    @strawberry.mutation(
        permission_classes=SIGNED_IN,
        description="Goes back to the model's previous traffic policy (operators).",
    )
    async def rollback_model(
        self, info: Info[Context, None], model: str, reason: str | None = None
    ) -> TrafficPolicyType:
        policy = await _service(info).rollback_model(
            info.context.require_principal(), model, reason=reason
        )
        await _taken_in(info)
        return TrafficPolicyType.of(policy)

    @strawberry.mutation(
        permission_classes=SIGNED_IN,
        description="Retires a version no traffic, shadow or pin reaches (operators); replicas "
        "unload it.",
    )
    async def retire_model_version(
        self, info: Info[Context, None], model: str, version: str
    ) -> ModelVersion:
        found = await _service(info).retire_version(
            info.context.require_principal(), model, version
        )
        return ModelVersion.of(found)

    @strawberry.mutation(
        permission_classes=SIGNED_IN,
        description="Pins a ready version for a tenant: the caller's (tenant admins), or any "
        "(operators, with tenantId).",
    )
    async def pin_model_version(
        self,
        info: Info[Context, None],
        model: str,
        version: str,
        tenant_id: strawberry.ID | None = None,
    ) -> ModelPin:
        pin = await _service(info).pin_version(
            info.context.require_principal(),
            model,
            version,
            tenant_id=parse_id(tenant_id, "tenantId") if tenant_id is not None else None,
        )
        await _taken_in(info)
        return ModelPin.of(pin)

    @strawberry.mutation(
        permission_classes=SIGNED_IN,
        description="Removes a tenant's pin; false when there was none.",
    )
    async def unpin_model_version(
        self, info: Info[Context, None], model: str, tenant_id: strawberry.ID | None = None
    ) -> bool:
        removed = await _service(info).unpin_version(
            info.context.require_principal(),
            model,
            tenant_id=parse_id(tenant_id, "tenantId") if tenant_id is not None else None,
        )
        await _taken_in(info)
        return removed
