"""The canary guard: a periodic pass, owned by the app, that rolls a canary back by itself when
it breaks its guard against live over the guard's window.

Every replica runs the pass; for each model one replica acts per interval (a Redis key set
with NX for the interval), so a breach causes one rollback, not one per replica. What a
rollback does (the policy back to live at 100%, an audit entry) is the registry's: it is the
`rollback` callable given here. The guard adds the event: a log line and a metric.
"""

from __future__ import annotations

import logging
import time
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
# (model, canary version, percent) -> the canary gets that share, live the rest; at 100 the
# canary is promoted (the registry audits it)
Ramp = Callable[[str, str, float], Awaitable[None]]


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
        ramp: Ramp | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stats = stats
        self._policies = policies
        self._rollback = rollback
        self._ramp = ramp
        self._clock = clock
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
        turn_ms = max(1, round(self._settings.canary_interval_s * 1000))
        for policy in self._policies.policies():
            guard = policy.canary
            canaries = {
                a.version: a.weight
                for a in policy.arms
                if a.weight > 0 and a.version != policy.live
            }
            if guard is None or not canaries:
                continue
            # one replica judges a model per interval; the others find the key set
            turn = self._keys("canary", policy.model)
            if not await self._redis.set(turn, 1, nx=True, px=turn_ms):
                continue
            verdicts += await self._judge(policy, guard, canaries)
        return verdicts

    async def _judge(
        self, policy: TrafficPolicy, guard: CanaryGuard, canaries: dict[str, float]
    ) -> list[Verdict]:
        live = await self._stats.window(policy.model, policy.live, guard.window_s)
        verdicts = []
        for version, weight in canaries.items():
            canary = await self._stats.window(policy.model, version, guard.window_s)
            verdict = judge(live, canary, guard)
            verdicts.append(verdict)
            if verdict.breached:
                await self._roll_back(verdict, policy.live)
                break  # the policy is back on live: its other arms are gone with it
            await self._step_up(policy, guard, version, weight, verdict)
        return verdicts

    async def _step_up(
        self,
        policy: TrafficPolicy,
        guard: CanaryGuard,
        version: str,
        weight: float,
        verdict: Verdict,
    ) -> None:
        """Gives a healthy canary the next step of its ramp once it has held its weight for a
        whole window (so the window judged it at that weight alone)."""
        steps = [step for step in guard.ramp if step > weight + 1e-9]
        if self._ramp is None or not steps:
            return
        held = self._ramp_key(policy.model, version)
        now = self._clock()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(held, f"{weight:g}", now)
            pipe.hget(held, f"{weight:g}")
            pipe.expire(held, self._settings.stats_retention_s)
            _, since_raw, _ = await pipe.execute()
        since = float(since_raw or now)
        if verdict.outcome is not Outcome.HEALTHY or now - since < guard.window_s:
            return
        log.info(
            "ramping %s: canary %s from %g%% to %g%% after a clean window",
            policy.model,
            version,
            weight,
            steps[0],
            extra={"event": "model.ramped", "model": policy.model, "version": version},
        )
        await self._ramp(policy.model, version, steps[0])
        # the next step's window starts now, not when a pass first sees the new weight
        await self._redis.hset(held, f"{steps[0]:g}", now)

    def _ramp_key(self, model: str, version: str) -> str:
        """When the canary was first seen at each weight (kept across replicas and restarts)."""
        return self._keys("ramp", model, version)

    async def _roll_back(self, verdict: Verdict, live: str) -> None:
        # Once per version for a while, whichever replica judges: another replica whose
        # snapshot has not yet heard of the rollback would otherwise roll back again.
        done = self._keys("rolled-back", verdict.model, verdict.version)
        quiet_s = max(60, round(4 * self._settings.canary_interval_s))
        if not await self._redis.set(done, 1, nx=True, ex=quiet_s):
            return
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
        # a later canary of the same version starts its ramp from the beginning
        await self._redis.delete(self._ramp_key(verdict.model, verdict.version))
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
