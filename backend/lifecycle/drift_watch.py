"""The drift watch: every interval one replica compares each version's current window with
its reference (in a thread: numpy and scipy), exports the figures as gauges, keeps a snapshot
in PostgreSQL, and makes each threshold crossing an event (a log line, a counter, an audit
entry). Also what `modelDrift` and the pin mutations read and change."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np
from redis.asyncio import Redis
from sqlalchemy import delete, insert, select

from backend.auth.audit import Outcome, record
from backend.auth.principal import Principal
from backend.config import DriftSettings
from backend.core.db import Database
from backend.core.models import DriftSnapshot
from backend.core.models.lifecycle import NAME_LENGTH, VERSION_LENGTH
from backend.core.redis import KeySpace
from backend.core.tasks import Periodic
from backend.errors import ValidationFailed
from backend.lifecycle import divergence
from backend.lifecycle.comparison import PolicyProvider
from backend.lifecycle.drift import SIGNALS, DriftSamples, Kind, Windows
from backend.lifecycle.errors import ModelNotFound

log = logging.getLogger(__name__)

# Renews the turn when this replica holds it, takes it when nobody does.
_TURN = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class DriftMetrics(Protocol):
    def drift(self, model: str, version: str, signal: str, figures: dict[str, float]) -> None: ...
    def drift_threshold(self, model: str, version: str, signal: str, threshold: float) -> None: ...
    def drift_exceeded(self, model: str, version: str, signal: str) -> None: ...
    def drift_cleared(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SignalDrift:
    name: str
    direction: str
    statistic: str
    value: float
    threshold: float
    exceeded: bool
    figures: dict[str, float] = field(default_factory=dict)  # every statistic computed

    def stored(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "direction": self.direction,
            "statistic": self.statistic,
            "value": self.value,
            "threshold": self.threshold,
            "exceeded": self.exceeded,
            "figures": self.figures,
        }

    @classmethod
    def of(cls, stored: Mapping[str, Any]) -> SignalDrift:
        return cls(
            name=str(stored["name"]),
            direction=str(stored["direction"]),
            statistic=str(stored["statistic"]),
            value=float(stored["value"]),
            threshold=float(stored["threshold"]),
            exceeded=bool(stored["exceeded"]),
            figures={k: float(v) for k, v in (stored.get("figures") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: datetime
    requests: int
    exceeded: bool
    signals: list[SignalDrift]


@dataclass(frozen=True, slots=True)
class Reference:
    pinned: bool
    requests: int
    since: datetime | None
    until: datetime | None


@dataclass(frozen=True, slots=True)
class DriftReport:
    model: str
    version: str
    reference: Reference | None
    current: Snapshot | None
    history: list[Snapshot]  # oldest first


def threshold_of(settings: DriftSettings, signal: str) -> float:
    if signal in settings.thresholds:
        return settings.thresholds[signal]
    if SIGNALS[signal].kind is Kind.VECTOR:
        return settings.centroid_threshold
    return settings.psi_threshold


def compare(settings: DriftSettings, windows: Mapping[str, Windows]) -> list[SignalDrift]:
    """Every signal whose windows both hold `min_samples`, and whose reference is full (or
    pinned), compared (CPU work: run it in a thread)."""
    out = []
    for name, found in windows.items():
        signal = SIGNALS[name]
        ref, cur = found.reference, found.current
        full = found.pinned or len(ref) >= settings.reference_size
        if not full or len(ref) < settings.min_samples or len(cur) < settings.min_samples:
            continue
        if signal.kind is Kind.VECTOR:
            a = np.stack([s.value for s in ref])  # type: ignore[misc]
            b = np.stack([s.value for s in cur])  # type: ignore[misc]
            if a.shape[1:] != b.shape[1:]:
                continue  # another embedding size: not comparable
            figures = {
                "centroid": divergence.centroid_distance(a, b),
                "mmd": divergence.mmd(a, b),
            }
        elif signal.kind is Kind.CATEGORY:
            figures = divergence.categorical(
                [str(s.value) for s in ref], [str(s.value) for s in cur]
            )
        else:
            figures = divergence.numeric(
                np.array([s.value for s in ref], dtype=np.float64),
                np.array([s.value for s in cur], dtype=np.float64),
                settings.bins,
            )
        figures = {k: round(v, 6) for k, v in figures.items()}
        threshold = threshold_of(settings, name)
        value = figures[signal.statistic]
        out.append(
            SignalDrift(
                name=name,
                direction=signal.direction,
                statistic=signal.statistic,
                value=value,
                threshold=threshold,
                exceeded=value > threshold,
                figures=figures,
            )
        )
    return out


class DriftWatch:
    """Compares the windows periodically (one replica at a time) and answers `modelDrift`."""

    def __init__(
        self,
        samples: DriftSamples,
        *,
        db: Database,
        redis: Redis,
        keys: KeySpace,
        settings: DriftSettings,
        metrics: DriftMetrics,
    ) -> None:
        self.samples = samples
        self._db = db
        self._redis = redis
        self._turn_key = keys.child("drift")("turn")
        self._settings = settings
        self._metrics = metrics
        self._me = uuid.uuid4().hex
        self.policies: PolicyProvider | None = None  # the registry snapshot, once known
        self._passes = Periodic(
            "drift comparison",
            self.check,
            interval_s=settings.interval_s,
            timeout_s=settings.timeout_s,
        )

    async def check(self) -> dict[tuple[str, str], list[SignalDrift]]:
        """One comparison of every version, when this replica holds the turn (it keeps it
        while it lives, so one replica's gauges tell the figures)."""
        turn_ms = str(max(1000, round(3 * self._settings.interval_s * 1000)))
        if not await self._redis.eval(_TURN, 1, self._turn_key, self._me, turn_ms):  # type: ignore[misc]
            self._metrics.drift_cleared()  # another replica tells them now
            return {}
        found = {}
        for model, version in await self.samples.versions():
            found[(model, version)] = await self.compare_version(model, version)
        await self._purge()
        return found

    async def compare_version(self, model: str, version: str) -> list[SignalDrift]:
        """Compares one version's windows now: gauges, a snapshot, and an event per crossing."""
        windows = await self.samples.windows(model, version)
        if not windows:
            await self.samples.forget(model, version)
            return []
        signals = await asyncio.to_thread(compare, self._settings, windows)
        if not signals:
            return signals
        for s in signals:
            self._metrics.drift(model, version, s.name, s.figures)
            self._metrics.drift_threshold(model, version, s.name, s.threshold)
        crossed = await self.samples.crossed(
            model, version, [s.name for s in signals if s.exceeded]
        )
        requests = max(len(w.current) for w in windows.values())
        async with self._db.session() as session:
            await session.execute(
                insert(DriftSnapshot).values(
                    model=model,
                    version=version,
                    requests=requests,
                    exceeded=any(s.exceeded for s in signals),
                    signals=[s.stored() for s in signals],
                )
            )
            for s in signals:
                if s.name not in crossed:
                    continue
                log.warning(
                    "drift: %s %s %s %s %.4g over its threshold %.4g",
                    model,
                    version,
                    s.name,
                    s.statistic,
                    s.value,
                    s.threshold,
                    extra={
                        "event": "model.drift_exceeded",
                        "model": model,
                        "version": version,
                        "signal": s.name,
                    },
                )
                self._metrics.drift_exceeded(model, version, s.name)
                await record(
                    session,
                    "model.drift_exceeded",
                    Outcome.FAILURE,
                    model=model,
                    version=version,
                    signal=s.name,
                    statistic=s.statistic,
                    value=s.value,
                    threshold=s.threshold,
                )
        return signals

    async def _purge(self) -> None:
        cutoff = datetime.now(UTC) - timedelta(days=self._settings.snapshot_retention_days)
        async with self._db.session() as session:
            await session.execute(delete(DriftSnapshot).where(DriftSnapshot.at < cutoff))

    # -- reading and pinning ---------------------------------------------------------------

    def _version(self, model: str, version: str | None) -> str:
        if len(model) > NAME_LENGTH:
            raise ValidationFailed(f"model is longer than {NAME_LENGTH} characters", field="model")
        if version is not None:
            if len(version) > VERSION_LENGTH:
                raise ValidationFailed(
                    f"version is longer than {VERSION_LENGTH} characters", field="version"
                )
            return version
        policy = self.policies.policy(model) if self.policies is not None else None
        if policy is None:
            raise ModelNotFound(f"no model {model!r} with a live version", model=model)
        return policy.live

    async def report(self, model: str, version: str | None, last: int) -> DriftReport:
        """The reference, the latest snapshot and up to `last` snapshots (oldest first) of
        `version` (None: the live one)."""
        if not 1 <= last <= self._settings.max_history:
            raise ValidationFailed(f"last must be 1 to {self._settings.max_history}", field="last")
        version = self._version(model, version)
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(DriftSnapshot)
                    .where(DriftSnapshot.model == model, DriftSnapshot.version == version)
                    .order_by(DriftSnapshot.at.desc(), DriftSnapshot.id)
                    .limit(last)
                )
            ).scalars()
            history = [
                Snapshot(
                    at=row.at,
                    requests=row.requests,
                    exceeded=row.exceeded,
                    signals=[SignalDrift.of(s) for s in row.signals],
                )
                for row in rows
            ][::-1]
        return DriftReport(
            model=model,
            version=version,
            reference=await self._reference(model, version),
            current=history[-1] if history else None,
            history=history,
        )

    async def _reference(self, model: str, version: str) -> Reference | None:
        windows = await self.samples.windows(model, version)
        if not windows:
            return None
        pin = await self.samples.pinned(model, version)
        reference = max((w.reference for w in windows.values()), key=len)
        if pin is not None:
            return Reference(True, len(reference), _time(pin.since), _time(pin.until))
        full = len(reference) >= self._settings.reference_size
        return Reference(
            False,
            len(reference),
            _time(reference[0].at) if reference else None,
            _time(reference[-1].at) if full else None,  # still filling: open-ended
        )

    async def pin(
        self, principal: Principal, model: str, version: str, since: datetime, until: datetime
    ) -> Reference:
        """Makes the samples taken between `since` and `until` the version's reference."""
        version = self._version(model, version)
        if since >= until:
            raise ValidationFailed("since must be before until", field="since")
        count = await self.samples.pin(model, version, since.timestamp(), until.timestamp())
        if not count:
            raise ValidationFailed(
                f"{model} {version} has no drift samples between {since.isoformat()} and "
                f"{until.isoformat()} (the latest {self._settings.history_size} of each signal "
                "are kept)",
                field="since",
            )
        await self._audit(
            principal,
            "model.drift_reference_pinned",
            model=model,
            version=version,
            since=since.isoformat(),
            until=until.isoformat(),
        )
        return Reference(True, count, since, until)

    async def unpin(self, principal: Principal, model: str, version: str) -> Reference | None:
        """Back to the first samples the version served as its reference."""
        version = self._version(model, version)
        await self.samples.unpin(model, version)
        await self._audit(principal, "model.drift_reference_unpinned", model=model, version=version)
        return await self._reference(model, version)

    async def _audit(self, principal: Principal, event: str, **details: Any) -> None:
        async with self._db.session(principal.tenant_id) as session:
            await record(
                session,
                event,
                Outcome.SUCCESS,
                tenant_id=principal.tenant_id,
                actor_id=principal.user_id,
                **details,
            )

    def start(self) -> None:
        self.samples.start()
        self._passes.start()

    async def close(self) -> None:
        await self._passes.close()
        await self.samples.close()


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
