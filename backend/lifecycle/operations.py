"""What a replica keeps about the versions it serves: serving figures, shadow runs and their
agreement, the canary guard, `modelComparison` and `operationsTimeline`; one object the app's
lifespan owns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from redis.asyncio import Redis

from backend.config import DriftSettings, LifecycleSettings
from backend.core.db import Database
from backend.core.redis import KeySpace
from backend.lifecycle._series import Series
from backend.lifecycle.canary import (
    CanaryWatch,
    Outcome,
    PolicySource,
    Ramp,
    Rollback,
    RollbackMetrics,
)
from backend.lifecycle.comparison import ModelComparisons, PolicyProvider
from backend.lifecycle.drift import DriftRecorder, DriftSamples
from backend.lifecycle.drift_watch import DriftMetrics, DriftWatch
from backend.lifecycle.policy import RegistrySnapshot, Route
from backend.lifecycle.shadow import Mirror, ShadowLedger, ShadowRunner
from backend.lifecycle.stats import ErrorCounts, ServingStats
from backend.lifecycle.timeline import OperationsTimelines, VersionHistory

L = TypeVar("L")
S = TypeVar("S")


class Policies(PolicySource, PolicyProvider, Protocol):
    """The registry snapshot a replica holds: every policy, and one model's."""


class OperationsMetrics(RollbackMetrics, DriftMetrics, Protocol):
    """The metrics the canary guard, the drift watch and the Models dashboard export."""

    def model_served(self, model: str, version: str, ok: bool, latency_s: float) -> None: ...

    def shadow_compared(self, model: str, version: str, metrics: Mapping[str, float]) -> None: ...

    def models_routed(
        self, weights: Iterable[tuple[str, str, str, float, bool]], reasons: Iterable[str]
    ) -> None: ...


ROLLBACK_REASONS = (Outcome.ERROR_RATE.value, Outcome.P95_LATENCY.value)  # the guards broken


def routing_of(snapshot: RegistrySnapshot) -> list[tuple[str, str, str, float, bool]]:
    """(model, version, role, percent, canary guarded) of every version with traffic."""
    found = []
    for model, policy in snapshot.policies.items():
        live = policy.live if policy.arms else None
        for arm in policy.arms:
            role = "live" if arm.version == live else "candidate"
            guarded = role == "candidate" and policy.canary is not None
            found.append((model, arm.version, role, arm.weight, guarded))
        if policy.shadow is not None:
            found.append((model, policy.shadow, "shadow", policy.shadow_rate * 100, False))
    return found


class ModelOperations:
    """Serving figures and shadow runs from the start; drift when given its settings and the
    database (`drift`: None when off); the canary guard and comparisons once the registry's
    policies are given (`use_registry`)."""

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        settings: LifecycleSettings,
        metrics: OperationsMetrics,
        *,
        drift: DriftSettings | None = None,
        db: Database | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._metrics = metrics
        self._series = Series(redis, keys, settings)
        self.stats = ServingStats(self._series, metrics.model_served)
        self.errors = ErrorCounts(self._series)  # every typed error's code (sightline_errors)
        self.agreements = ShadowLedger(self._series, metrics.shadow_compared)
        self.shadows = ShadowRunner(self.agreements, settings, self.stats)
        self.comparisons: ModelComparisons | None = None
        self.timelines: OperationsTimelines | None = None
        self._canaries: CanaryWatch | None = None
        # what the request paths record drift samples into (None: drift off, nothing recorded)
        self.drift: DriftRecorder | None = None
        self.drift_watch: DriftWatch | None = None
        if drift is not None and drift.enabled and db is not None:
            self.drift = DriftRecorder(drift)
            samples = DriftSamples(redis, keys, drift, self.drift)
            self.drift_watch = DriftWatch(
                samples, db=db, redis=redis, keys=keys, settings=drift, metrics=metrics
            )

    async def promoted(self, model: str, version: str) -> None:
        """`version` became live by a promotion: its drift reference starts afresh."""
        if self.drift_watch is not None:
            await self.drift_watch.samples.restart_reference(model, version)

    def use_registry(
        self, policies: Policies, rollback: Rollback, ramp: Ramp | None = None
    ) -> None:
        """Starts the canary guard on `policies` (rolling back with `rollback`, stepping the
        ramps of guards that have one with `ramp`) and answers `modelComparison` from them."""
        self.comparisons = ModelComparisons(
            self.stats, self.agreements, policies, max_window_s=self._settings.stats_retention_s
        )
        if self.drift_watch is not None:
            self.drift_watch.policies = policies  # `modelDrift` of a model's live version
        if self._canaries is None:
            self._canaries = CanaryWatch(
                self.stats,
                policies,
                rollback,
                redis=self._redis,
                keys=self._keys,
                settings=self._settings,
                metrics=self._metrics,
                ramp=ramp,
            )
            self._canaries.start()

    def use_history(
        self, snapshot: Callable[[], RegistrySnapshot], history: VersionHistory
    ) -> None:
        """Answers `operationsTimeline` for the versions of `snapshot`, with `history`'s
        version events; exports the traffic of `snapshot` now (then `routed` on each change)."""
        self._metrics.models_routed(routing_of(snapshot()), ROLLBACK_REASONS)
        self.timelines = OperationsTimelines(
            self.stats,
            self.errors,
            snapshot,
            history,
            bucket_s=self._settings.stats_bucket_s,
            max_window_s=self._settings.stats_retention_s,
            max_points=self._settings.timeline_max_points,
            max_events=self._settings.timeline_max_events,
        )

    async def routed(self, snapshot: RegistrySnapshot) -> None:
        """A registry watcher's listener: the traffic weights and canaries as gauges."""
        self._metrics.models_routed(routing_of(snapshot), ROLLBACK_REASONS)

    def mirror(
        self,
        route: Route,
        live_result: L,
        live_latency_s: float,
        run: Callable[[], Awaitable[S]],
        compare: Callable[[L, S], Mapping[str, float]],
    ) -> bool:
        """Runs the request again on `route.shadow` (set by the router when this request is
        sampled) once the live answer is delivered; see `ShadowRunner.mirror`."""
        if route.shadow is None:
            return False
        return self.shadows.mirror(
            Mirror(
                route.model, route.version, route.shadow, live_result, live_latency_s, run, compare
            )
        )

    def start(self) -> None:
        self._series.start()
        if self.drift_watch is not None:
            self.drift_watch.start()

    async def flush(self) -> None:
        """Sends the serving figures and error counts gathered since the last periodic flush
        now (a caller that reads them back at once, as the operations view's test does)."""
        await self._series.flush()

    async def close(self) -> None:
        """Stops the guard, the drift watch and the shadows, then sends the last figures."""
        if self._canaries is not None:
            await self._canaries.close()
        if self.drift_watch is not None:
            await self.drift_watch.close()
        await self.shadows.close()
        await self._series.close()
