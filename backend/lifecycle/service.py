"""The model registry: versions of every model we serve, one traffic policy per model (with its
history, for rollbacks), tenants' pins, and the replicas' readiness of loading versions. No SQL
here (see the repository), no web framework.

Operators (owners of SIGHTLINE_PRIVACY_OPERATOR_TENANT; `principal=None`: the CLI or the server
itself) register versions and change policies; a tenant admin pins versions for the tenant.
Every change runs under the registry's row lock (so changes are serialised and each bumps the
registry's revision once), is audited in the same unit of work, and once committed is
published over Redis with the new revision: every replica's `RegistryWatcher` reloads then.
A change that fails leaves the policy in force as it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from typing import Any, Final

from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.audit import Outcome, record
from backend.auth.errors import MissingScope, NotOperator
from backend.auth.principal import Principal
from backend.auth.scopes import Scope
from backend.auth.service import AuthService
from backend.config import LifecycleSettings, ModelSpec
from backend.core.db import Database
from backend.core.models import ModelVersionRow
from backend.core.models.knowledge import EMBEDDING_DIMENSIONS
from backend.core.redis import KeySpace
from backend.errors import NotFound, ValidationFailed
from backend.inference.manifest import ChecksumError, ManifestError, ModelManifest
from backend.lifecycle import repository as repo
from backend.lifecycle.errors import (
    ChecksumMismatch,
    InvalidModelSpec,
    InvalidTrafficPolicy,
    ModelNotFound,
    NothingToRollBack,
    StalePolicy,
    VersionExists,
    VersionInUse,
    VersionNotFound,
    VersionNotServable,
)
from backend.lifecycle.policy import (
    Arm,
    CanaryGuard,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    StickyKey,
    TrafficPolicy,
    VersionStatus,
)
from backend.lifecycle.readiness import Replicas
from backend.lifecycle.rules import (
    SERVABLE,
    check_names,
    kind_and_task,
    statuses_for,
    validate_policy,
)
from backend.lifecycle.schemas import (
    MAX_NOTES_CHARS,
    MAX_REASON_CHARS,
    MODEL_NAME,
    SHA256,
    VERSION_NAME,
    AttackHeadSpec,
    EmbeddingSpec,
    ModelDetails,
    PinDetails,
    VersionDetails,
    arms_json,
    canary_json,
    policy_of,
)
from backend.lifecycle.timeline import VersionEvent, events_of

log = logging.getLogger(__name__)

_PUBLISH_TIMEOUT_S = 2.0


class _Keep(Enum):
    KEEP = "keep"


KEEP: Final = _Keep.KEEP  # a policy field left as it is


@dataclasses.dataclass(frozen=True)
class SeedEntry:
    """A model this server serves, registered at start unless the registry has it."""

    model: str
    kind: ModelKind
    task: str
    version: str
    spec: dict[str, Any]
    sha256: str | None = None


class ModelRegistryService:
    def __init__(
        self,
        *,
        db: Database,
        redis: Redis,
        keys: KeySpace,
        settings: LifecycleSettings,
        auth: AuthService,
        operator_tenant: str | None,
    ) -> None:
        self._db = db
        self._redis = redis
        self._keys = keys.child("models")
        self._settings = settings
        self._auth = auth
        self._operator_tenant = operator_tenant
        self.channel = self._keys("changed")  # {"revision": n} after every committed change
        self.last_revision = 0  # the newest revision this service committed
        self.replicas = Replicas(redis, self._keys, settings)
        # told of each version that became live by a promotion (the drift reference restarts)
        self.on_promoted: Callable[[str, str], Awaitable[None]] | None = None

    # -- who may -------------------------------------------------------------------------

    async def require_operator(self, principal: Principal | None, what: str) -> None:
        if principal is None or await self._auth.is_operator(principal, self._operator_tenant):
            return
        await self._auth.record_denial(principal, what, None)
        raise NotOperator("only platform operators manage the model registry")

    async def _require_admin(self, principal: Principal | None, what: str) -> None:
        if principal is None or principal.has(Scope.ADMIN):
            return
        await self._auth.record_denial(principal, what, None)
        raise MissingScope("the admin scope is required", scope=Scope.ADMIN.value)

    # -- reading -------------------------------------------------------------------------

    @property
    def redis(self) -> Redis:
        """Where changes are published (and where the serving figures are kept)."""
        return self._redis

    @property
    def db(self) -> Database:
        """Where the registry is kept."""
        return self._db

    async def snapshot(self) -> RegistrySnapshot:
        """The whole registry as every replica routes by (all tenants' pins included)."""
        async with self._db.session() as session:
            # the revision first: a change committed meanwhile is read with an older number,
            # and its message makes the replica read again
            revision = await repo.revision(session)
            models = {m.name: m for m in await repo.models(session)}
            rows = await repo.versions(session)
            policies = await repo.policies(session)
            pins = await repo.all_pins(session)
        versions: dict[str, list[ModelVersionRecord]] = {name: [] for name in models}
        for row in rows:
            info = models[row.model]
            versions[row.model].append(
                ModelVersionRecord(
                    model=row.model,
                    version=row.version,
                    kind=ModelKind(info.kind),
                    task=info.task,
                    status=VersionStatus(row.status),
                    spec=row.spec,
                    sha256=row.sha256,
                )
            )
        return RegistrySnapshot(
            versions={name: tuple(found) for name, found in versions.items()},
            policies={p.model: _policy(p) for p in policies},
            pins={(str(tenant), model): version for tenant, model, version in pins},
            revision=revision,
        )

    async def models(self, principal: Principal | None) -> list[ModelDetails]:
        await self._require_admin(principal, "Query.models")
        operator = await self._sees_all_pins(principal)
        async with self._db.session(principal.tenant_id if principal else None) as session:
            return [
                await self._details(session, m.name, m.kind, m.task, operator)
                for m in await repo.models(session)
            ]

    async def model(self, principal: Principal | None, name: str) -> ModelDetails:
        await self._require_admin(principal, "Query.model")
        operator = await self._sees_all_pins(principal)
        async with self._db.session(principal.tenant_id if principal else None) as session:
            found = await repo.model(session, name)
            if found is None:
                raise ModelNotFound(f"no model {name!r}", model=name)
            return await self._details(session, found.name, found.kind, found.task, operator)

    async def _sees_all_pins(self, principal: Principal | None) -> bool:
        return principal is None or await self._auth.is_operator(principal, self._operator_tenant)

    @staticmethod
    async def _details(
        session: AsyncSession, name: str, kind: str, task: str, all_pins: bool
    ) -> ModelDetails:
        policy = await repo.policy(session, name)
        if all_pins:
            pins = [
                PinDetails(tenant, model, version)
                for tenant, model, version in await repo.all_pins(session)
                if model == name
            ]
        else:  # the tenant's own (row-level security)
            pins = [
                PinDetails(p.tenant_id, p.model, p.version) for p in await repo.pins(session, name)
            ]
        return ModelDetails(
            name=name,
            kind=ModelKind(kind),
            task=task,
            versions=[_version(v) for v in await repo.versions(session, name)],
            policy=_policy(policy) if policy is not None else None,
            pins=pins,
        )

    # -- versions ------------------------------------------------------------------------

    async def register_version(
        self,
        principal: Principal | None,
        model: str,
        version: str,
        *,
        spec: Mapping[str, Any],
        kind: ModelKind | None = None,
        task: str | None = None,
        sha256: str | None = None,
        notes: str = "",
    ) -> VersionDetails:
        """Registers a version (and the model, given its kind, when it is new). A vision
        version's files are checked against their sha256 first; it then loads on every
        replica (LOADING until all report it ready). Chat, embedding and guardrail versions are
        READY."""
        await self.require_operator(principal, "Mutation.registerModelVersion")
        check_names(model, version)
        if sha256 is not None:
            sha256 = sha256.strip().lower()
            if not SHA256.match(sha256):
                raise InvalidModelSpec("sha256 must be 64 hexadecimal digits", field="sha256")
        if len(notes) > MAX_NOTES_CHARS:
            raise InvalidModelSpec(f"notes are limited to {MAX_NOTES_CHARS} characters")
        if len(json.dumps(dict(spec), default=str)) > self._settings.max_spec_bytes:
            raise InvalidModelSpec(
                f"the spec is larger than {self._settings.max_spec_bytes} bytes", field="spec"
            )
        tenant = principal.tenant_id if principal else None
        async with self._db.session(tenant) as session:
            known = await repo.model(session, model)
            if known is not None and await repo.version(session, model, version) is not None:
                raise VersionExists(f"{model}@{version} is registered already", model=model)
        if task is None and kind is ModelKind.VISION and isinstance(spec.get("task"), str):
            task = spec["task"]  # a new vision model: its manifest says its task
        kind, task = kind_and_task(model, known, kind, task)
        spec, sha256 = await self._checked_spec(model, version, kind, task, dict(spec), sha256)
        if kind is ModelKind.GUARDRAIL:
            await self._reads_a_known_embedder(tenant, spec)
        status = VersionStatus.LOADING if kind is ModelKind.VISION else VersionStatus.READY
        async with self._db.session(tenant) as session:
            await repo.lock_registry(session)
            await repo.add_model(session, model, kind.value, task)
            stored = await repo.model(session, model)
            assert stored is not None
            if stored.kind != kind.value or stored.task != task:  # made meanwhile
                raise InvalidModelSpec(f"{model} is a {stored.kind} model ({stored.task})")
            added = await repo.add_version(
                session,
                model=model,
                version=version,
                spec=spec,
                sha256=sha256,
                status=status.value,
                registered_by=principal.user_id if principal else None,
                notes=notes,
            )
            if not added:
                raise VersionExists(f"{model}@{version} is registered already", model=model)
            revision = await repo.bump_revision(session)
            await self._audit(
                session, principal, "model.version_registered", model=model, version=version
            )
            row = await repo.version(session, model, version)
            assert row is not None
        await self._published(revision)
        return _version(row)

    async def _reads_a_known_embedder(self, tenant: uuid.UUID | None, spec: dict[str, Any]) -> None:
        """A guardrail head reads an embedding model's vectors: once the registry knows the
        embedding models (a server seeds the knowledge base's at start), one of them. A head
        for another model could only fail closed wherever it served."""
        async with self._db.session(tenant) as session:
            known = sorted(
                m.name for m in await repo.models(session) if m.kind == ModelKind.EMBEDDING.value
            )
        if known and spec["embedding_model"] not in known:
            raise InvalidModelSpec(
                f"the head reads {spec['embedding_model']} vectors; the registry's embedding "
                f"models are {', '.join(known)}",
                field="spec",
            )

    async def _checked_spec(  # noqa: PLR0917
        self,
        model: str,
        version: str,
        kind: ModelKind,
        task: str,
        spec: dict[str, Any],
        sha256: str | None,
    ) -> tuple[dict[str, Any], str | None]:
        """The spec as stored and the version's artifact sha256; typed errors for specs that
        cannot be served and files that do not match."""
        checked = _SPEC_OF_KIND.get(kind)
        if checked is not None:  # not a manifest: nothing to verify on disk
            return checked(spec), sha256
        spec.setdefault("name", model)
        spec.setdefault("version", version)
        if spec["name"] != model or spec["version"] != version:
            raise InvalidModelSpec(
                f"the manifest names {spec['name']}@{spec['version']}, not {model}@{version}"
            )
        try:
            manifest = ModelManifest.from_dict(spec)
        except ManifestError as exc:
            raise InvalidModelSpec(str(exc), field="spec") from None
        if manifest.task.value != task:
            raise InvalidModelSpec(f"the manifest's task is {manifest.task.value}, not {task}")
        if manifest.in_process:
            raise InvalidModelSpec(
                f"runtime {manifest.runtime} runs inside each server, which registers the version "
                "it has at start; register a version on an inference pool runtime",
                field="spec",
            )
        if sha256 is not None and manifest.sha256 and manifest.sha256.lower() != sha256:
            raise ChecksumMismatch("sha256 differs from the manifest's", field="sha256")
        if sha256 is not None and manifest.weights:
            manifest = dataclasses.replace(manifest, sha256=sha256)
        try:
            async with asyncio.timeout(self._settings.verify_timeout_s):
                await asyncio.to_thread(manifest.verify)  # hashes files: not on the loop
        except ChecksumError as exc:
            raise ChecksumMismatch(str(exc)) from None
        except ManifestError as exc:
            raise InvalidModelSpec(str(exc), field="spec") from None
        except TimeoutError:
            raise InvalidModelSpec(
                f"checking the files took over {self._settings.verify_timeout_s} s"
            ) from None
        return manifest.to_dict(), sha256 or manifest.sha256

    async def retire_version(
        self, principal: Principal | None, model: str, version: str
    ) -> VersionDetails:
        """Retires a version no traffic reaches (replicas unload it); kept for the record."""
        await self.require_operator(principal, "Mutation.retireModelVersion")
        async with self._db.session(principal.tenant_id if principal else None) as session:
            await repo.lock_registry(session)
            row = await _existing_version(session, model, version)
            policy = await repo.policy(session, model)
            if policy is not None:
                current = _policy(policy)
                if any(a.version == version for a in current.arms):
                    raise VersionInUse(
                        f"{model}@{version} carries traffic; change the policy first"
                    )
                if current.shadow == version:
                    raise VersionInUse(f"{model}@{version} is the shadow; change the policy first")
            pinned = [t for t, m, v in await repo.all_pins(session) if m == model and v == version]
            if pinned:
                raise VersionInUse(
                    f"{model}@{version} is pinned by {len(pinned)} tenant(s)", tenants=len(pinned)
                )
            if row.status != VersionStatus.RETIRED:
                await repo.set_status(session, model, version, VersionStatus.RETIRED.value)
            revision = await repo.bump_revision(session)
            await self._audit(
                session, principal, "model.version_retired", model=model, version=version
            )
            row = await _existing_version(session, model, version)
        await self._published(revision)
        return _version(row)

    # -- traffic policies ----------------------------------------------------------------

    async def set_traffic_policy(
        self,
        principal: Principal | None,
        model: str,
        arms: Sequence[Arm],
        *,
        sticky: StickyKey | _Keep = KEEP,
        shadow: str | _Keep | None = KEEP,
        shadow_rate: float | _Keep = KEEP,
        canary: CanaryGuard | _Keep | None = KEEP,
        expected_revision: int | None = None,
        reason: str | None = None,
    ) -> TrafficPolicy:
        """Replaces the model's arms (weights in percent, summing to 100); the fields left as
        KEEP stay as they are. `expected_revision`: refused (STALE_TRAFFIC_POLICY) when the
        policy has changed since."""
        await self.require_operator(principal, "Mutation.setTrafficPolicy")

        def change(current: TrafficPolicy | None) -> TrafficPolicy:
            if expected_revision is not None:
                have = current.revision if current else 0
                if have != expected_revision:
                    raise StalePolicy(
                        f"the policy is at revision {have}, not {expected_revision}",
                        revision=have,
                    )
            base = current or TrafficPolicy(model=model, arms=())
            return TrafficPolicy(
                model=model,
                arms=tuple(arms),
                sticky=base.sticky if sticky is KEEP else sticky,
                shadow=base.shadow if shadow is KEEP else shadow,
                shadow_rate=base.shadow_rate if shadow_rate is KEEP else shadow_rate,
                canary=base.canary if canary is KEEP else canary,
            )

        return await self._change_policy(principal, model, "set", change, reason)

    async def promote_version(
        self, principal: Principal | None, model: str, version: str
    ) -> TrafficPolicy:
        """Gives `version` all the traffic; the versions that had it stay READY (loaded) for a
        rollback. Promoting the shadow ends the shadowing."""
        await self.require_operator(principal, "Mutation.promoteModelVersion")
        was_live = False

        def change(current: TrafficPolicy | None) -> TrafficPolicy:
            nonlocal was_live
            base = current or TrafficPolicy(model=model, arms=())
            was_live = bool(base.arms) and base.live == version
            shadow = None if base.shadow == version else base.shadow
            return dataclasses.replace(
                base,
                arms=(Arm(version, 100.0),),
                shadow=shadow,
                shadow_rate=base.shadow_rate if shadow else 0.0,
            )

        policy = await self._change_policy(principal, model, "promote", change, None)
        if not was_live and self.on_promoted is not None:
            try:
                await self.on_promoted(model, version)
            except Exception as exc:  # the promotion is committed; its side effects follow it
                log.warning("after promoting %s@%s: %r", model, version, exc)
        return policy

    async def rollback_model(
        self, principal: Principal | None, model: str, *, reason: str | None = None
    ) -> TrafficPolicy:
        """Goes back to the policy before the current one (arms, sticky key, shadow, canary
        guard). A rollback is itself a revision; rolling back again goes further back."""
        await self.require_operator(principal, "Mutation.rollbackModel")
        async with self._db.session(principal.tenant_id if principal else None) as session:
            await repo.lock_registry(session)
            if await repo.model(session, model) is None:
                raise ModelNotFound(f"no model {model!r}", model=model)
            row = await repo.policy(session, model)
            current = (
                await repo.policy_revision(session, model, row.revision)
                if row is not None
                else None
            )
            if row is None or current is None or current.previous_revision is None:
                raise NothingToRollBack(f"{model} has no earlier policy to go back to")
            earlier = await repo.policy_revision(session, model, current.previous_revision)
            assert earlier is not None
            restored = policy_of(
                model,
                earlier.arms,
                earlier.sticky,
                earlier.shadow,
                earlier.shadow_rate,
                earlier.canary,
                row.revision + 1,
            )
            policy, revision = await self._store_policy(
                session,
                principal,
                restored,
                action="rollback",
                previous=earlier.previous_revision,
                reason=reason,
                restored=earlier.revision,
            )
        await self._published(revision)
        return policy

    async def _change_policy(
        self,
        principal: Principal | None,
        model: str,
        action: str,
        change: Any,
        reason: str | None,
    ) -> TrafficPolicy:
        async with self._db.session(principal.tenant_id if principal else None) as session:
            await repo.lock_registry(session)
            if await repo.model(session, model) is None:
                raise ModelNotFound(f"no model {model!r}", model=model)
            row = await repo.policy(session, model)
            current = _policy(row) if row is not None else None
            wanted = change(current)
            wanted = dataclasses.replace(wanted, revision=(current.revision if current else 0) + 1)
            policy, revision = await self._store_policy(
                session,
                principal,
                wanted,
                action=action,
                previous=current.revision if current else None,
                reason=reason,
            )
        await self._published(revision)
        return policy

    async def _store_policy(
        self,
        session: AsyncSession,
        principal: Principal | None,
        policy: TrafficPolicy,
        *,
        action: str,
        previous: int | None,
        reason: str | None,
        restored: int | None = None,
    ) -> tuple[TrafficPolicy, int]:
        """Validates and saves the policy with its revision, sets the versions' statuses to
        match it, audits; (the policy, the registry's new revision)."""
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise InvalidTrafficPolicy(f"reason is limited to {MAX_REASON_CHARS} characters")
        rows = {v.version: v for v in await repo.versions(session, policy.model)}
        validate_policy(policy, {v: VersionStatus(r.status) for v, r in rows.items()})
        found = await repo.model(session, policy.model)
        if found is not None and found.kind == ModelKind.EMBEDDING.value:
            _one_embedding_version(policy)
        actor = principal.user_id if principal else None
        values = {
            "arms": arms_json(policy.arms),
            "sticky": policy.sticky.value,
            "shadow": policy.shadow,
            "shadow_rate": policy.shadow_rate,
            "canary": canary_json(policy.canary),
        }
        await repo.save_policy(
            session, policy.model, {**values, "revision": policy.revision, "updated_by": actor}
        )
        await repo.add_revision(
            session,
            policy.model,
            {
                **values,
                "revision": policy.revision,
                "previous_revision": previous,
                "action": action,
                "reason": reason,
                "changed_by": actor,
            },
        )
        for version, status in statuses_for(policy, rows).items():
            await repo.set_status(session, policy.model, version, status.value)
        revision = await repo.bump_revision(session)
        await self._audit(
            session,
            principal,
            f"model.policy_{action}",
            model=policy.model,
            revision=policy.revision,
            arms=values["arms"],
            shadow=policy.shadow,
            restored=restored,
            reason=reason,
        )
        return policy, revision

    async def version_events(self, since: datetime, limit: int) -> list[VersionEvent]:
        """What the policy changes since `since` did to versions (promotions, canaries,
        rollbacks, the canary guard's among them), oldest first; at most `limit`, the newest.
        From the policy revisions, the registry's own record: the guard's changes are audited
        with no tenant, which the app's role cannot read back."""
        async with self._db.session() as session:
            changes = await repo.policy_changes(session, since, limit)
        return events_of(changes)

    # -- pins ----------------------------------------------------------------------------

    async def pin_version(
        self,
        principal: Principal | None,
        model: str,
        version: str,
        *,
        tenant_id: uuid.UUID | None = None,
    ) -> PinDetails:
        """Every request of the tenant (default: the caller's) to `model` gets `version`. A
        tenant admin pins for the tenant; an operator for any."""
        target = await self._pin_target(principal, tenant_id, "Mutation.pinModelVersion")
        async with self._db.session(target) as session:
            await repo.lock_registry(session)
            row = await _existing_version(session, model, version)
            if VersionStatus(row.status) not in SERVABLE:
                raise VersionNotServable(
                    f"{model}@{version} is {row.status}; only a ready version can be pinned",
                    status=row.status,
                )
            await repo.pin(
                session, target, model, version, principal.user_id if principal else None
            )
            revision = await repo.bump_revision(session)
            await self._audit(
                session, principal, "model.pinned", tenant_id=target, model=model, version=version
            )
        await self._published(revision)
        return PinDetails(target, model, version)

    async def unpin_version(
        self, principal: Principal | None, model: str, *, tenant_id: uuid.UUID | None = None
    ) -> bool:
        """Removes the tenant's pin; whether there was one."""
        target = await self._pin_target(principal, tenant_id, "Mutation.unpinModelVersion")
        async with self._db.session(target) as session:
            await repo.lock_registry(session)
            if await repo.model(session, model) is None:
                raise ModelNotFound(f"no model {model!r}", model=model)
            was = await repo.unpin(session, target, model)
            if was is None:
                return False
            revision = await repo.bump_revision(session)
            await self._audit(
                session, principal, "model.unpinned", tenant_id=target, model=model, version=was
            )
        await self._published(revision)
        return True

    async def _pin_target(
        self, principal: Principal | None, tenant_id: uuid.UUID | None, what: str
    ) -> uuid.UUID:
        """The tenant a pin is for. To anyone but an operator another tenant does not exist
        (NOT_FOUND, as everywhere)."""
        if principal is not None and (tenant_id is None or tenant_id == principal.tenant_id):
            await self._require_admin(principal, what)
            return principal.tenant_id
        if tenant_id is None:
            raise ValidationFailed("name the tenant to pin for", field="tenant")
        if principal is not None and not await self._auth.is_operator(
            principal, self._operator_tenant
        ):
            await self._auth.record_denial(principal, what, None)
            raise NotFound("no such tenant", id=str(tenant_id))
        async with self._db.session() as session:
            if not await repo.tenant_exists(session, tenant_id):
                raise NotFound("no such tenant", id=str(tenant_id))
        return tenant_id

    # -- seeding -------------------------------------------------------------------------

    async def seed(self, entries: Sequence[SeedEntry]) -> list[tuple[str, str]]:
        """Registers the models this server serves that the registry lacks: a new model's
        version is live with all the traffic, a new version of a known model is READY (the
        policy in force stays). Idempotent, and safe when replicas start together (under the
        registry lock; every insert also skips what exists). Returns what it added."""
        added: list[tuple[str, str]] = []
        async with self._db.session() as session:
            await repo.lock_registry(session)
            for entry in entries:
                if not (MODEL_NAME.match(entry.model) and VERSION_NAME.match(entry.version)):
                    log.warning(
                        "not seeding %s@%s: not a registry name", entry.model, entry.version
                    )
                    continue
                await repo.add_model(session, entry.model, entry.kind.value, entry.task)
                known = await repo.model(session, entry.model)
                assert known is not None
                if known.kind != entry.kind.value:
                    log.warning(
                        "not seeding %s: the registry has it as a %s model", entry.model, known.kind
                    )
                    continue
                fresh = await repo.add_version(
                    session,
                    model=entry.model,
                    version=entry.version,
                    spec=entry.spec,
                    sha256=entry.sha256,
                    status=VersionStatus.READY.value,
                    registered_by=None,
                    notes="served at start",
                )
                if not fresh:
                    continue
                added.append((entry.model, entry.version))
                values = {
                    "arms": arms_json((Arm(entry.version, 100.0),)),
                    "sticky": StickyKey.USER.value,
                    "revision": 1,
                }
                if await repo.add_policy(session, entry.model, values):
                    await repo.add_revision(
                        session,
                        entry.model,
                        {**values, "action": "seed", "previous_revision": None},
                    )
                    await repo.set_status(
                        session, entry.model, entry.version, VersionStatus.LIVE.value
                    )
            if not added:
                return []
            revision = await repo.bump_revision(session)
            await self._audit(
                session, None, "model.seeded", versions=[f"{m}@{v}" for m, v in added]
            )
        await self._published(revision)
        return added

    # -- readiness of loading versions ---------------------------------------------------

    async def report_readiness(
        self, replica_id: str, model: str, version: str, ok: bool, error: str | None = None
    ) -> VersionStatus | None:
        """A replica loaded and warmed `version` (ok) or could not (error). The version
        becomes READY once every live replica has reported it ok, FAILED as soon as one has
        failed. Returns its status when this report settled it."""
        await self.replicas.record(replica_id, model, version, ok, error)
        return await self.settle(model, version)

    async def settle(self, model: str, version: str) -> VersionStatus | None:
        """Moves a LOADING version to READY or FAILED when the live replicas' reports say so;
        None while they do not (or it is not loading)."""
        outcome, error = await self.replicas.outcome(model, version)
        if outcome is None:
            return None
        async with self._db.session() as session:
            await repo.lock_registry(session)
            row = await repo.version(session, model, version)
            if row is None or row.status != VersionStatus.LOADING:
                return None
            await repo.set_status(session, model, version, outcome.value, error)
            revision = await repo.bump_revision(session)
            await self._audit(
                session,
                None,
                f"model.version_{outcome.value}",
                model=model,
                version=version,
                error=error,
            )
        await self._published(revision)
        return outcome

    # -- common --------------------------------------------------------------------------

    async def _audit(
        self,
        session: AsyncSession,
        principal: Principal | None,
        event: str,
        *,
        tenant_id: uuid.UUID | None = None,
        **details: Any,
    ) -> None:
        """An audit entry in the actor's tenant (`tenant_id`: the session's tenant, when the
        change is another tenant's: its admins see it in their log)."""
        await record(
            session,
            event,
            Outcome.SUCCESS,
            tenant_id=tenant_id or (principal.tenant_id if principal else None),
            actor_id=principal.user_id if principal else None,
            **{k: str(v) if isinstance(v, uuid.UUID) else v for k, v in details.items()},
        )

    async def _published(self, revision: int) -> None:
        """Tells every replica (committed already: a lost message is made good by their
        periodic reconcile)."""
        self.last_revision = max(self.last_revision, revision)
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT_S):
                await self._redis.publish(self.channel, json.dumps({"revision": revision}))
        except Exception as exc:  # the change stands; replicas reconcile
            log.warning("model registry: publishing revision %d failed: %s", revision, exc)


def _chat_spec(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return ModelSpec.model_validate(spec).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidModelSpec.listing("invalid chat model spec", exc) from exc


def _embedding_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """An embedding version's spec as stored: one the knowledge base can use."""
    try:
        checked = EmbeddingSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidModelSpec.listing("invalid embedding model spec", exc) from exc
    if checked.dimensions != EMBEDDING_DIMENSIONS:
        raise InvalidModelSpec(
            f"the knowledge base stores {EMBEDDING_DIMENSIONS}-dimensional vectors, "
            f"not {checked.dimensions}",
            field="spec",
        )
    if checked.provider == "openai" and not checked.base_url:
        raise InvalidModelSpec("an endpoint embedding model needs its base_url", field="spec")
    return checked.model_dump(mode="json")


def _guardrail_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A guardrail version's spec as stored: a learned head for the knowledge base's vectors
    (the guardrails' embedder is the knowledge base's)."""
    try:
        checked = AttackHeadSpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidModelSpec.listing("invalid guardrail model spec", exc) from exc
    if len(checked.weights) != EMBEDDING_DIMENSIONS:
        raise InvalidModelSpec(
            f"the guardrails read {EMBEDDING_DIMENSIONS}-dimensional vectors; this head has "
            f"{len(checked.weights)} weights",
            field="spec",
        )
    return checked.model_dump(mode="json")


# the spec as stored of each kind that is not a manifest (vision)
_SPEC_OF_KIND: dict[ModelKind, Callable[[dict[str, Any]], dict[str, Any]]] = {
    ModelKind.CHAT: _chat_spec,
    ModelKind.EMBEDDING: _embedding_spec,
    ModelKind.GUARDRAIL: _guardrail_spec,
}


def _one_embedding_version(policy: TrafficPolicy) -> None:
    """Vectors of two embedding versions never mix: the knowledge base searches with one
    version at a time, re-embedded when it changes. An embedding model's policy gives all its
    traffic to one version (a shadow is compared on the side: backend.knowledge.versions)."""
    serving = [a for a in policy.arms if a.weight > 0]
    if len(serving) != 1:
        raise InvalidTrafficPolicy(
            "an embedding model serves one version at a time (its vectors are not comparable "
            "with another's): give one version 100 and promote to change it"
        )


async def _existing_version(session: AsyncSession, model: str, version: str) -> ModelVersionRow:
    row = await repo.version(session, model, version)
    if row is None:
        if await repo.model(session, model) is None:
            raise ModelNotFound(f"no model {model!r}", model=model)
        raise VersionNotFound(f"no version {version} of {model}", version=version)
    return row


def _policy(row: Any) -> TrafficPolicy:
    return policy_of(
        row.model, row.arms, row.sticky, row.shadow, row.shadow_rate, row.canary, row.revision
    )


def _version(row: ModelVersionRow) -> VersionDetails:
    registered_at: datetime | None = row.registered_at
    return VersionDetails(
        model=row.model,
        version=row.version,
        status=row.status,
        spec=row.spec,
        sha256=row.sha256,
        error=row.error,
        notes=row.notes,
        registered_by=row.registered_by,
        registered_at=registered_at,
    )


__all__ = ["KEEP", "ModelRegistryService", "SeedEntry"]
