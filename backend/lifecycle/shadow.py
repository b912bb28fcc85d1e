"""Shadow traffic: a sampled live request also runs on the shadow version after its answer is
delivered; the two results are compared and the agreement kept per (model, live version,
shadow version), across replicas, like the serving figures.

The comparisons are pure functions of two results. `ShadowRunner` owns the shadow runs: a
bounded number at once, each with a timeout, all cancelled on close. A shadow's result never
goes anywhere but its comparison, and its failure is only counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from backend.config import LifecycleSettings
from backend.lifecycle._series import Series
from backend.lifecycle.stats import ServingStats

log = logging.getLogger(__name__)

L = TypeVar("L")
S = TypeVar("S")

METRIC_SUM = "m."  # the sum of a comparison's figures
METRIC_COUNT = "c."  # how many pairs gave it (a zero sum is still a mean)
IOU_MATCH = 0.5
TOP_K = 10


# -- comparisons -----------------------------------------------------------------------------


def top1_agreement(live_label: str | None, shadow_label: str | None) -> float:
    """Classification: 1.0 when both versions put the same label first."""
    return 1.0 if live_label == shadow_label else 0.0


def iou(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Intersection over union of two boxes given as {x, y, width, height}."""
    left, top = max(a["x"], b["x"]), max(a["y"], b["y"])
    right = min(a["x"] + a["width"], b["x"] + b["width"])
    bottom = min(a["y"] + a["height"], b["y"] + b["height"])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = a["width"] * a["height"] + b["width"] * b["height"] - inter
    return inter / union if union > 0 else 0.0


def detection_f1(
    live: Sequence[Mapping[str, Any]],
    shadow: Sequence[Mapping[str, Any]],
    threshold: float = IOU_MATCH,
) -> float:
    """Detection: F1 of the shadow's boxes against live's. Greedy by the shadow's score, each
    shadow box takes the unmatched live box of the same label with the highest IoU, if that
    IoU is at least `threshold`. Two empty results agree (1.0)."""
    if not live and not shadow:
        return 1.0
    free = list(range(len(live)))
    matches = 0
    for found in sorted(shadow, key=lambda o: -float(o.get("score", 0.0))):
        best, best_iou = None, threshold
        for index in free:
            if live[index]["label"] != found["label"]:
                continue
            overlap = iou(live[index]["box"], found["box"])
            if overlap >= best_iou:
                best, best_iou = index, overlap
        if best is not None:
            free.remove(best)
            matches += 1
    return 2 * matches / (len(live) + len(shadow))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in linear memory: one row of the table at a time, the insertions
    of a row as a running minimum (numpy), so a page pair costs milliseconds."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    target = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    steps = np.arange(len(b) + 1, dtype=np.int64)
    row = steps.copy()
    for index, char in enumerate(a, start=1):
        best = np.empty_like(row)
        best[0] = index
        # substitution (or match) from the diagonal, deletion from above
        best[1:] = np.minimum(row[:-1] + (target != ord(char)), row[1:] + 1)
        # insertion: best[j] = min over k <= j of best[k] + (j - k)
        row = np.minimum.accumulate(best - steps) + steps
    return int(row[-1])


def normalise_text(text: str) -> str:
    """Whitespace runs as one space: line breaks and spacing are layout, not characters read."""
    return " ".join(text.split())


def character_error_rate(found: str, reference: str) -> float:
    """OCR: edits to turn `found` into `reference` per reference character (0 is identical)."""
    reference = normalise_text(reference)
    return edit_distance(normalise_text(found), reference) / max(1, len(reference))


def cosine_similarity(a: Sequence[float], b: Sequence[float]) -> float:
    """Chat: similarity of two answers' embeddings (1.0 same direction; 0.0 if one is zero)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm else 0.0


def top_k_overlap(live: Sequence[object], shadow: Sequence[object], k: int = TOP_K) -> float:
    """Embeddings: share of the top-k result ids both versions return for the same query."""
    a, b = list(live[:k]), list(shadow[:k])
    if not a and not b:
        return 1.0
    return len(set(a) & set(b)) / max(len(a), len(b))


def decision_agreement(live_flagged: bool, shadow_flagged: bool) -> dict[str, float]:
    """A guardrail: 1.0 when both versions decide alike; and each one's flag (their means are
    the share of messages each flags: a shadow that would block more than live shows it here,
    before it blocks anyone)."""
    return {
        "decision_agreement": 1.0 if live_flagged == shadow_flagged else 0.0,
        "live_flagged": float(live_flagged),
        "shadow_flagged": float(shadow_flagged),
    }


def compare_vision(
    task: str, live: Mapping[str, Any], shadow: Mapping[str, Any]
) -> dict[str, float]:
    """The agreement of two results of a vision task as the vision service returns them
    (`classes`, `objects`, `text`)."""
    if task in ("classify", "classification"):
        first = [(r.get("classes") or [{}])[0].get("label") for r in (live, shadow)]
        return {"top1_agreement": top1_agreement(first[0], first[1])}
    if task in ("detect", "detection"):
        return {"detection_f1": detection_f1(live.get("objects", []), shadow.get("objects", []))}
    if task == "ocr":
        return {"cer": character_error_rate(shadow.get("text", ""), live.get("text", ""))}
    raise ValueError(f"no comparison for vision task {task!r}")


# -- what is kept ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShadowAgreement:
    """How a shadow version compared with live over the last `seconds`, on every replica."""

    model: str
    live_version: str
    shadow_version: str
    seconds: float
    compared: int  # pairs compared
    failed: int  # shadow runs that raised or timed out
    skipped: int  # sampled requests not mirrored: too many shadow runs at once
    metrics: dict[str, float] = field(default_factory=dict)  # the mean of each comparison
    live_latency_s: float | None = None  # mean over the compared pairs
    shadow_latency_s: float | None = None


class ShadowLedger:
    """Adds up shadow comparisons per (model, live version, shadow version)."""

    def __init__(
        self,
        series: Series,
        observed: Callable[[str, str, Mapping[str, float]], None] | None = None,
    ) -> None:
        self._series = series
        self._observed = observed  # (model, shadow version, metrics): the Prometheus side

    def _of(self, model: str, live: str, shadow: str) -> tuple[str, ...]:
        return ("shadow", model, live, shadow)

    def compared(
        self,
        model: str,
        live: str,
        shadow: str,
        metrics: Mapping[str, float],
        *,
        live_latency_s: float,
        shadow_latency_s: float,
    ) -> None:
        fields = {METRIC_SUM + name: value for name, value in metrics.items()}
        fields |= {METRIC_COUNT + name: 1 for name in metrics}
        fields |= {"n": 1, "live_s": live_latency_s, "shadow_s": shadow_latency_s}
        self._series.add(self._of(model, live, shadow), fields)
        if self._observed is not None:
            self._observed(model, shadow, metrics)

    def failed(self, model: str, live: str, shadow: str) -> None:
        self._series.add(self._of(model, live, shadow), {"failed": 1})

    def skipped(self, model: str, live: str, shadow: str) -> None:
        self._series.add(self._of(model, live, shadow), {"skipped": 1})

    async def window(self, model: str, live: str, shadow: str, seconds: float) -> ShadowAgreement:
        fields = await self._series.read(self._of(model, live, shadow), seconds)
        n = int(fields.get("n", 0))
        return ShadowAgreement(
            model=model,
            live_version=live,
            shadow_version=shadow,
            seconds=min(seconds, self._series.retention_s),
            compared=n,
            failed=int(fields.get("failed", 0)),
            skipped=int(fields.get("skipped", 0)),
            metrics={
                name.removeprefix(METRIC_COUNT): fields.get(
                    METRIC_SUM + name.removeprefix(METRIC_COUNT), 0.0
                )
                / count
                for name, count in fields.items()
                if name.startswith(METRIC_COUNT) and count
            },
            live_latency_s=fields.get("live_s", 0.0) / n if n else None,
            shadow_latency_s=fields.get("shadow_s", 0.0) / n if n else None,
        )


# -- running shadows -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mirror(Generic[L, S]):
    """A live request to run again on the shadow version."""

    model: str
    live_version: str
    shadow_version: str
    live_result: L
    live_latency_s: float
    run: Callable[[], Awaitable[S]]  # runs the shadow; never charges the caller's budget
    compare: Callable[[L, S], Mapping[str, float]]  # named agreement figures (off the loop)


class ShadowRunner:
    """Runs shadow versions after live answers, off their path, and records the agreement."""

    def __init__(
        self,
        ledger: ShadowLedger,
        settings: LifecycleSettings,
        stats: ServingStats | None = None,
    ) -> None:
        self._ledger = ledger
        self._settings = settings
        self._stats = stats  # the shadow's own figures (modelComparison's shadow row)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def mirror(self, request: Mirror[L, S]) -> bool:
        """Starts a shadow run; call it once the live answer is delivered. It returns at once
        (nothing is awaited): the run happens in a task this runner owns, and its result goes
        nowhere but `compare`. False when not started: runner closed, or
        `shadow_max_in_flight` runs already going (counted as skipped)."""
        if self._closed:
            return False
        if len(self._tasks) >= self._settings.shadow_max_in_flight:
            self._ledger.skipped(request.model, request.live_version, request.shadow_version)
            return False
        task = asyncio.create_task(
            self._shadow(request), name=f"shadow:{request.model}@{request.shadow_version}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _shadow(self, request: Mirror[L, S]) -> None:
        await asyncio.sleep(0)  # the caller that started it goes on first
        model, live, shadow = request.model, request.live_version, request.shadow_version
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._settings.shadow_timeout_s):
                result = await request.run()
            took = time.perf_counter() - started
            metrics = await asyncio.to_thread(request.compare, request.live_result, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the shadow's failure is a figure, never the caller's
            log.info("shadow %s@%s failed: %s", model, shadow, exc or type(exc).__name__)
            self._ledger.failed(model, live, shadow)
            if self._stats is not None:
                self._stats.record(model, shadow, ok=False, latency_s=time.perf_counter() - started)
            return
        if self._stats is not None:
            self._stats.record(model, shadow, ok=True, latency_s=took)
        finite = {name: value for name, value in metrics.items() if math.isfinite(value)}
        self._ledger.compared(
            model,
            live,
            shadow,
            finite,
            live_latency_s=request.live_latency_s,
            shadow_latency_s=took,
        )

    async def close(self) -> None:
        """Cancels every shadow run and waits for them to end (a shadow is never worth a wait)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel("shutdown")
        if tasks:
            # bounded: a shadow's own code could swallow the cancellation
            _, stuck = await asyncio.wait(tasks, timeout=min(5.0, self._settings.shadow_timeout_s))
            if stuck:
                log.warning("%d shadow runs did not stop when cancelled", len(stuck))
