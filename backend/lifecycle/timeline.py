"""`operationsTimeline`: every served model version's figures per step over a window, typed
errors by code over the same steps, and the registry's version events (promotions, canaries,
rollbacks) to mark on the time axis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from backend.core.models import TrafficPolicyRevision
from backend.errors import ValidationFailed
from backend.lifecycle.policy import RegistrySnapshot, VersionStatus
from backend.lifecycle.stats import ErrorCounts, ServingStats, VersionWindow

# A version out of the policy (a canary rolled back, the live one before a promotion) is
# shown while it still served something in the window.
_SERVABLE = {VersionStatus.READY, VersionStatus.LIVE, VersionStatus.CANARY, VersionStatus.SHADOW}
CANARY_GUARD = "canary guard"  # how the canary guard's changes start their reason


@dataclass(frozen=True, slots=True)
class VersionEvent:
    at: datetime
    model: str
    version: str
    event: str  # seed, promote, traffic, canary, canary_ramp, shadow, rollback, canary_rollback


@dataclass(frozen=True, slots=True)
class VersionTimeline:
    model: str
    version: str
    kind: str
    status: str
    points: tuple[tuple[datetime, VersionWindow], ...]


@dataclass(frozen=True, slots=True)
class OperationsTimeline:
    window_s: int
    step_s: int
    models: tuple[VersionTimeline, ...]
    errors: dict[str, list[tuple[datetime, int]]]  # code -> count per step
    events: tuple[VersionEvent, ...]


class VersionHistory(Protocol):
    """The registry's version events since a moment (at most `limit`, the newest)."""

    def __call__(self, since: datetime, limit: int) -> Awaitable[list[VersionEvent]]: ...


def _arms(row: TrafficPolicyRevision | None) -> dict[str, float]:
    return {str(a["version"]): float(a["weight"]) for a in (row.arms if row else [])}


def _live(arms: dict[str, float]) -> str:
    return max(arms.items(), key=lambda a: a[1])[0] if arms else ""


def events_of(
    changes: Sequence[tuple[TrafficPolicyRevision, TrafficPolicyRevision | None]],
) -> list[VersionEvent]:
    """What each policy revision did to a version, from it and the revision it replaced."""
    found: list[VersionEvent] = []
    for row, before in changes:
        after_arms, before_arms = _arms(row), _arms(before)
        live = _live(after_arms)
        by_guard = (row.reason or "").startswith(CANARY_GUARD)
        added = [v for v in after_arms if v not in before_arms and v != live]
        removed = [v for v in before_arms if v not in after_arms]
        others = [v for v in after_arms if v != live]
        if row.action in ("seed", "promote"):
            found.append(VersionEvent(row.created_at, row.model, live, row.action))
        elif row.action == "rollback":
            name = "canary_rollback" if by_guard else "rollback"
            found.append(VersionEvent(row.created_at, row.model, (removed or [live])[0], name))
        elif by_guard:
            found.append(
                VersionEvent(row.created_at, row.model, (others or [live])[0], "canary_ramp")
            )
        elif added and row.canary is not None:
            found.append(VersionEvent(row.created_at, row.model, added[0], "canary"))
        elif after_arms != before_arms:
            found.append(VersionEvent(row.created_at, row.model, (added or [live])[0], "traffic"))
        if row.shadow and (before is None or before.shadow != row.shadow):
            found.append(VersionEvent(row.created_at, row.model, row.shadow, "shadow"))
    return found


class OperationsTimelines:
    """Reads the timeline of every version the registry serves, within bounds (settings)."""

    def __init__(
        self,
        stats: ServingStats,
        errors: ErrorCounts,
        snapshot: Callable[[], RegistrySnapshot],
        history: VersionHistory,
        *,
        bucket_s: int,
        max_window_s: int,
        max_points: int,
        max_events: int,
    ) -> None:
        self._stats = stats
        self._errors = errors
        self._snapshot = snapshot
        self._history = history
        self._bucket_s = bucket_s
        self._max_window_s = max_window_s
        self._max_points = max_points
        self._max_events = max_events

    def check(self, window_s: int, step_s: int) -> None:
        """BAD_USER_INPUT unless the window is within the retention, the step a multiple of the
        stats' bucket within the window, and the points at most `max_points`."""
        if not 0 < window_s <= self._max_window_s:
            raise ValidationFailed(
                f"window must be more than 0 and at most {self._max_window_s} seconds",
                field="window",
            )
        if step_s <= 0 or step_s % self._bucket_s or step_s > window_s:
            raise ValidationFailed(
                f"step must be a multiple of {self._bucket_s} seconds, at most the window",
                field="step",
            )
        if window_s / step_s > self._max_points:
            raise ValidationFailed(
                f"window / step must be at most {self._max_points} points", field="step"
            )

    async def read(self, window_s: int, step_s: int) -> OperationsTimeline:
        self.check(window_s, step_s)
        snapshot = self._snapshot()
        wanted: list[tuple[str, str, str, str, bool]] = []  # model, version, kind, status, kept
        for model, records in sorted(snapshot.versions.items()):
            policy = snapshot.policies.get(model)
            in_policy = {a.version for a in policy.arms} if policy else set()
            if policy is not None and policy.shadow:
                in_policy.add(policy.shadow)
            for record in records:
                if record.version in in_policy or record.status in _SERVABLE:
                    wanted.append(
                        (
                            model,
                            record.version,
                            record.kind.value,
                            record.status.value,
                            record.version in in_policy,
                        )
                    )
        since = datetime.now(UTC) - timedelta(seconds=window_s)
        timelines, errors, events = await asyncio.gather(
            asyncio.gather(*(self._stats.timeline(m, v, window_s, step_s) for m, v, *_ in wanted)),
            self._errors.timeline(window_s, step_s),
            self._history(since, self._max_events),
        )
        models = tuple(
            VersionTimeline(model, version, kind, status, tuple((_at(s), w) for s, w in points))
            for (model, version, kind, status, kept), points in zip(wanted, timelines, strict=True)
            if kept or any(w.requests for _, w in points)
        )
        return OperationsTimeline(
            window_s=window_s,
            step_s=step_s,
            models=models,
            errors={code: [(_at(s), n) for s, n in counts] for code, counts in errors.items()},
            events=tuple(events),
        )


def _at(epoch_s: int) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)
