"""Per-version serving figures across replicas: requests, errors, latency percentiles, tokens,
compute-seconds and cost over a recent window.

Latency is kept as counts in fixed buckets (the same bounds on every replica), so p50 and p95
over all replicas come from the summed counts, not from an average of percentiles.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from backend.lifecycle._series import Series

# 1 ms to about 2 minutes, each bound 1.25x the one before: a percentile is within 25%.
LATENCY_BOUNDS: tuple[float, ...] = tuple(round(0.001 * 1.25**i, 6) for i in range(53))


@dataclass(frozen=True, slots=True)
class VersionWindow:
    """What one model version served over the last `seconds`, on every replica."""

    model: str
    version: str
    seconds: float
    requests: int
    errors: int
    p50_s: float | None  # None: no request
    p95_s: float | None
    tokens: int
    compute_s: float
    cost: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def percentile(
    counts: Sequence[float], q: float, bounds: Sequence[float] = LATENCY_BOUNDS
) -> float | None:
    """The q-quantile (0..1) of a histogram: `counts[i]` values fell in (bounds[i-1], bounds[i]]
    (the last count: above every bound), interpolated linearly inside its bucket."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1]  # above the last bound: that bound is what is known
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * (rank - seen) / count
        seen += count
    return bounds[-1]


class ServingStats:
    """Records every served request of a model version; reads a window across replicas."""

    def __init__(
        self, series: Series, observed: Callable[[str, str, bool, float], None] | None = None
    ) -> None:
        self._series = series
        self._observed = observed  # (model, version, ok, latency_s): the Prometheus side

    def record(
        self,
        model: str,
        version: str,
        *,
        ok: bool,
        latency_s: float,
        tokens: int = 0,
        compute_s: float = 0.0,
        cost: float = 0.0,
    ) -> None:
        """One served request (memory only: flushed to Redis in the background)."""
        slot = bisect.bisect_left(LATENCY_BOUNDS, latency_s)
        self._series.add(
            ("stats", model, version),
            {
                "n": 1,
                "err": 0 if ok else 1,
                f"h{slot}": 1,
                "tokens": tokens,
                "compute_s": compute_s,
                "cost": cost,
            },
        )
        if self._observed is not None:
            self._observed(model, version, ok, latency_s)

    async def timeline(
        self, model: str, version: str, seconds: float, step_s: int
    ) -> list[tuple[int, VersionWindow]]:
        """The figures of each step of `step_s` over the last `seconds`, oldest first, as
        (the step's start in epoch seconds, its figures)."""
        steps = await self._series.read_steps(("stats", model, version), seconds, step_s)
        return [(start, window_of(model, version, step_s, fields)) for start, fields in steps]

    async def window(self, model: str, version: str, seconds: float) -> VersionWindow:
        """The figures of the last `seconds` (whole buckets; at most the retention)."""
        fields = await self._series.read(("stats", model, version), seconds)
        return window_of(model, version, min(seconds, self._series.retention_s), fields)


class ErrorCounts:
    """Typed errors by code over time, on every replica (the figures of sightline_errors)."""

    SERIES = ("errors",)

    def __init__(self, series: Series) -> None:
        self._series = series

    def record(self, code: str) -> None:
        """One typed error (memory only); `code` must already be bounded (a metrics label)."""
        self._series.add(self.SERIES, {code: 1})

    async def timeline(self, seconds: float, step_s: int) -> dict[str, list[tuple[int, int]]]:
        """Each code seen over the last `seconds`, with its count per step, oldest first."""
        steps = await self._series.read_steps(self.SERIES, seconds, step_s)
        codes = sorted({code for _, fields in steps for code in fields})
        return {
            code: [(start, int(fields.get(code, 0))) for start, fields in steps] for code in codes
        }


def window_of(
    model: str, version: str, seconds: float, fields: Mapping[str, float]
) -> VersionWindow:
    counts = [fields.get(f"h{i}", 0.0) for i in range(len(LATENCY_BOUNDS) + 1)]
    return VersionWindow(
        model=model,
        version=version,
        seconds=seconds,
        requests=int(fields.get("n", 0)),
        errors=int(fields.get("err", 0)),
        p50_s=percentile(counts, 0.50),
        p95_s=percentile(counts, 0.95),
        tokens=int(fields.get("tokens", 0)),
        compute_s=fields.get("compute_s", 0.0),
        cost=fields.get("cost", 0.0),
    )
