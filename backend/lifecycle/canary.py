"""The canary guard: a periodic pass, owned by the app, that rolls a canary back by itself when
it breaks its guard against live over the guard's window.

Every replica runs the pass; for each model one replica acts per interval (a Redis key set
with NX for the interval), so a breach causes one rollback, not one per replica. What a
rollback does (the policy back to live at 100%, an audit entry) is the registry's: it is the
`rollback` callable given here. The guard adds the event: a log line and a metric.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.redis import KeySpace
from backend.core.tasks import Periodic
from backend.lifecycle.policy import CanaryGuard, TrafficPolicy
from backend.lifecycle.stats import ServingStats, VersionWindow

log = logging.getLogger(__name__)

# (model, reason) -> the policy is back on live at 100% (the registry audits it)
Rollback = Callable[[str, str], Awaitable[None]]


class PolicySource(Protocol):
    """The traffic policies in force (the registry snapshot this replica holds)."""

    def policies(self) -> Iterable[TrafficPolicy]: ...


class RollbackMetrics(Protocol):
    def model_rolled_back(self, model: str, version: str, reason: str) -> None: ...


class Outcome(StrEnum):
    UNDECIDED = "undecided"  # fewer than min_requests on either side
    HEALTHY = "healthy"
    ERROR_RATE = "error_rate"
    P95_LATENCY = "p95_latency"


@dataclass(frozen=True, slots=True)
class Verdict:
    model: str
    version: str
    outcome: Outcome
    detail: str

    @property
    def breached(self) -> bool:
        return self.outcome in (Outcome.ERROR_RATE, Outcome.P95_LATENCY)


def judge(live: VersionWindow, canary: VersionWindow, guard: CanaryGuard) -> Verdict:
    """Whether `canary` breaks `guard` against `live` (pure)."""

    def verdict(outcome: Outcome, detail: str) -> Verdict:
        return Verdict(canary.model, canary.version, outcome, detail)

    if min(live.requests, canary.requests) < guard.min_requests:
        return verdict(
            Outcome.UNDECIDED,
            f"{canary.requests} canary and {live.requests} live requests "
            f"(at least {guard.min_requests} each)",
        )
    if canary.error_rate > live.error_rate + guard.max_error_rate_delta:
        return verdict(
            Outcome.ERROR_RATE,
            f"error rate {canary.error_rate:.1%} against live's {live.error_rate:.1%} "
            f"(at most {guard.max_error_rate_delta:.1%} more) over {canary.requests} requests",
        )
    if (
        canary.p95_s is not None
        and live.p95_s is not None
        and canary.p95_s > guard.max_p95_ratio * live.p95_s
    ):
        return verdict(
            Outcome.P95_LATENCY,
            f"p95 {canary.p95_s * 1000:.0f} ms against live's {live.p95_s * 1000:.0f} ms "
            f"(at most {guard.max_p95_ratio:g}x)",
        )
    return verdict(Outcome.HEALTHY, "within its guard")


class CanaryWatch:
    """Compares every canary arm with live each interval; rolls back a canary that breaks its
    guard."""

    def __init__(
        self,
        stats: ServingStats,
        policies: PolicySource,
        rollback: Rollback,
        *,
        redis: Redis,
        keys: KeySpace,
        settings: LifecycleSettings,
        metrics: RollbackMetrics,
    ) -> None:
        self._stats = stats
        self._policies = policies
        self._rollback = rollback
        self._redis = redis
        self._keys = keys.child("lifecycle")
        self._settings = settings
        self._metrics = metrics
        self._passes = Periodic(
            "canary guard pass",
            self.check,
            interval_s=settings.canary_interval_s,
            timeout_s=settings.canary_timeout_s,
        )

    async def check(self) -> list[Verdict]:
        """One pass over every guarded policy this replica holds the turn for; returns the
        verdicts of the canaries it judged (those rolled back among them)."""
        verdicts: list[Verdict] = []
        turn_s = max(1, round(self._settings.canary_interval_s))
        for policy in self._policies.policies():
            guard = policy.canary
            canaries = [a.version for a in policy.arms if a.weight > 0 and a.version != policy.live]
            if guard is None or not canaries:
                continue
            # one replica judges a model per interval; the others find the key set
            if not await self._redis.set(self._keys("canary", policy.model), 1, nx=True, ex=turn_s):
                continue
            verdicts += await self._judge(policy, guard, canaries)
        return verdicts

    async def _judge(
        self, policy: TrafficPolicy, guard: CanaryGuard, canaries: list[str]
    ) -> list[Verdict]:
        live = await self._stats.window(policy.model, policy.live, guard.window_s)
        verdicts = []
        for version in canaries:
            canary = await self._stats.window(policy.model, version, guard.window_s)
            verdict = judge(live, canary, guard)
            verdicts.append(verdict)
            if verdict.breached:
                await self._roll_back(verdict, policy.live)
                break  # the policy is back on live: its other arms are gone with it
        return verdicts

    async def _roll_back(self, verdict: Verdict, live: str) -> None:
        reason = f"canary {verdict.version} broke its guard: {verdict.detail}"
        log.warning(
            "rolling %s back to %s: %s",
            verdict.model,
            live,
            reason,
            extra={
                "event": "model.rolled_back",
                "model": verdict.model,
                "version": verdict.version,
                "guard": verdict.outcome.value,
            },
        )
        await self._rollback(verdict.model, reason)
        self._metrics.model_rolled_back(verdict.model, verdict.version, verdict.outcome.value)

    def start(self) -> None:
        if self._settings.canary_enabled:
            self._passes.start()

    @property
    def running(self) -> bool:
        return self._passes.running

    async def close(self) -> None:
        """Stops the passes; one in progress is cancelled."""
        await self._passes.close()
