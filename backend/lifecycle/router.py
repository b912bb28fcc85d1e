"""Which version of a model serves a request on this replica.

A `ModelRouter` holds the latest registry snapshot it was given (the highest revision wins: a
late reconcile never undoes a newer change) and routes each request: an explicit pin in the
request (`"name@version"`), then the tenant's pin, then the policy's weighted split by the stable
hash of the sticky key, then the model's default here. It routes only to versions this replica
can serve now (`is_ready`): when the policy's arm (or the tenant's pin) is not ready here yet, the
request goes to the live, else a previous, ready version, so a replica that is behind never fails
a request. An explicit pin to a version that is unknown or not loaded here is the caller's error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from backend.errors import ValidationFailed
from backend.inference.client import InferenceClient, ModelUnavailable
from backend.lifecycle.policy import (
    RegistrySnapshot,
    RequestKey,
    Route,
    RouteReason,
    VersionStatus,
    pick_arm,
    shadow_sampled,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# is_ready(model, version): whether this replica serves that version now
IsReady = Callable[[str, str], bool]
# local_versions(model): the versions this replica serves now, its default first
LocalVersions = Callable[[str], Sequence[str]]


class UnknownVersion(ValidationFailed):
    """A pin to a version that is unknown or not loaded here (BAD_USER_INPUT, naming those
    there are)."""


class ModelRouter:
    """Routes requests to versions with the latest registry snapshot this replica has seen."""

    def __init__(self, is_ready: IsReady, local_versions: LocalVersions) -> None:
        self._is_ready = is_ready
        self._local_versions = local_versions
        self._snapshot = RegistrySnapshot()

    @classmethod
    def over(
        cls, client: InferenceClient, in_process: Sequence[tuple[str, str]] = ()
    ) -> ModelRouter:
        """A router over what an inference client serves (its `manifests()`) and the
        `in_process` versions (model, version) the server runs itself, which come first (the
        model's default) when the client serves other versions of the same model."""

        def local_versions(model: str) -> list[str]:
            own = [v for m, v in in_process if m == model]
            versions = [m.version for m in client.manifests() if m.name == model]
            try:
                default = [] if own else [client.manifest(model).version]
            except ModelUnavailable:
                default = []
            return list(dict.fromkeys([*own, *default, *versions]))

        return cls(lambda model, version: version in local_versions(model), local_versions)

    @property
    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    def apply(self, snapshot: RegistrySnapshot) -> bool:
        """Keeps `snapshot` unless an older revision than the one held; says whether it did."""
        if snapshot.revision < self._snapshot.revision:
            return False
        self._snapshot = snapshot
        return True

    async def __call__(self, snapshot: RegistrySnapshot) -> None:
        """The registry watcher's listener."""
        self.apply(snapshot)

    def available(self, model: str) -> list[str]:
        """The versions of `model` a request may pin here (ready on this replica)."""
        found = list(self._local_versions(model))
        for record in self._snapshot.versions.get(model, ()):
            if record.version not in found and self._is_ready(model, record.version):
                found.append(record.version)
        return found

    def route(self, model: str, key: RequestKey, explicit: str | None = None) -> Route:
        """The version that serves this request here. Raises UnknownVersion for an explicit
        pin to a version not served here, and for a model with no version here at all."""
        if explicit is not None:
            if self._is_ready(model, explicit):
                return Route(model, explicit, RouteReason.REQUEST_PIN)
            available = self.available(model)
            raise UnknownVersion(
                f"{model} has no version {explicit!r} here; available: "
                + (", ".join(available) or "none"),
                model=model,
                version=explicit,
                available=available,
            )
        snapshot = self._snapshot
        pinned = snapshot.pins.get((key.tenant_id, model))
        if pinned is not None and self._is_ready(model, pinned):
            return Route(model, pinned, RouteReason.TENANT_PIN)
        policy = snapshot.policies.get(model)
        if policy is not None and policy.arms:
            sticky = key.of(policy.sticky)
            arm = pick_arm(policy, sticky)
            shadow = None
            if (
                policy.shadow is not None
                and policy.shadow != arm
                and shadow_sampled(policy, key.request_id or sticky)
                and self._is_ready(model, policy.shadow)
            ):
                shadow = policy.shadow
            if self._is_ready(model, arm):
                return Route(model, arm, RouteReason.POLICY, shadow)
            fallback = self._fallback(model, exclude=arm)
            if fallback is not None:
                log.debug("%s: arm %s is not ready here; %s serves", model, arm, fallback)
                return Route(model, fallback, RouteReason.DEFAULT)
        else:
            fallback = self._fallback(model)
            if fallback is not None:
                return Route(model, fallback, RouteReason.DEFAULT)
        raise UnknownVersion(f"no version of {model!r} is served here", model=model, available=[])

    def _fallback(self, model: str, exclude: str | None = None) -> str | None:
        """What serves when the policy's arm cannot here: the live arm, the other arms by
        weight, the registry's live versions, then this replica's default and the others."""
        candidates: list[str] = []
        policy = self._snapshot.policies.get(model)
        if policy is not None:
            candidates.append(policy.live)
            candidates += [a.version for a in sorted(policy.arms, key=lambda a: -a.weight)]
        candidates += [
            r.version
            for r in self._snapshot.versions.get(model, ())
            if r.status is VersionStatus.LIVE
        ]
        candidates += list(self._local_versions(model))
        for version in candidates:
            if version != exclude and self._is_ready(model, version):
                return version
        return None


async def run_routed(
    router: ModelRouter,
    model: str,
    key: RequestKey,
    explicit: str | None,
    run: Callable[[str], Awaitable[T]],
) -> tuple[Route, T]:
    """Routes a request and runs it on the version chosen. A version retired between the two
    (ModelUnavailable: it drains and refuses new items) is routed again, once, unless the
    request pinned it: a swap fails no request."""
    route = router.route(model, key, explicit)
    try:
        return route, await run(route.version)
    except ModelUnavailable:
        if explicit is not None:
            raise
        again = router.route(model, key, None)
        if again.version == route.version:
            raise
        return again, await run(again.version)
