"""The interface the rest of Sightline uses to run models; the pool is one implementation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Protocol

from backend.inference.manifest import ModelManifest


class Priority(IntEnum):
    LIVE = 0  # camera frames: served first
    BATCH = 1  # uploads and jobs


class InferenceError(Exception):
    code = "INFERENCE_FAILED"


class Overloaded(InferenceError):
    code = "OVERLOADED"


class ModelUnavailable(InferenceError):
    code = "MODEL_UNAVAILABLE"


class WorkerLost(InferenceError):
    code = "WORKER_LOST"


class OutOfMemory(InferenceError):
    code = "OUT_OF_MEMORY"


class ServiceUnavailable(InferenceError):
    """The remote inference service did not answer (down, unreachable, or its circuit open)."""

    code = "INFERENCE_UNAVAILABLE"


class SignatureMismatch(ModelUnavailable):
    """A served model's inputs or outputs (names, datatypes, shapes) are not its manifest's:
    the version never serves."""

    code = "MODEL_SIGNATURE_MISMATCH"


ERRORS: dict[str, type[InferenceError]] = {
    e.code: e
    for e in (
        InferenceError,
        Overloaded,
        ModelUnavailable,
        WorkerLost,
        OutOfMemory,
        ServiceUnavailable,
        SignatureMismatch,
    )
}


class ModelStatus(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"  # retired: refuses new items, finishes its own, then unloads


@dataclass
class ModelState:
    manifest: ModelManifest
    status: ModelStatus = ModelStatus.LOADING
    error: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    batches: int = 0
    items: int = 0


@dataclass(frozen=True)
class ItemTiming:
    """Where one input's time went (`time.monotonic()` readings of the serving process)."""

    model: str
    version: str
    enqueued: float
    dispatched: float  # its batch left for a worker
    done: float  # its batch's results came back
    batch_size: int
    compute_s: float  # the batch's run inside the worker


# A caller that wants its inputs' timings (a trace) sets a list here; a client that measures
# them appends one ItemTiming per input it answers. Unset (the default), nothing is kept.
ITEM_TIMINGS: ContextVar[list[ItemTiming] | None] = ContextVar("item_timings", default=None)


class InferenceClient(Protocol):
    """What the rest of Sightline uses; the pool is one implementation."""

    async def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        version: str | None = None,
        priority: Priority = Priority.BATCH,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """One output per input, by `version` of `model` (none: the model's default)."""
        ...

    def manifest(self, model: str, version: str | None = None) -> ModelManifest:
        """A version's manifest (none: the default version's)."""
        ...

    def manifests(self) -> list[ModelManifest]:
        """What can be asked for, every version (each manifest names its own)."""
        ...


class InferenceMetrics(Protocol):
    """Where the pool reports what it does (the app passes its Prometheus metrics)."""

    def inference_batch(
        self, model: str, version: str, size: int, waits_s: list[float], run_s: float
    ) -> None: ...

    def inference_queue(self, model: str, version: str, depth: int) -> None: ...

    def inference_capacity(self, model: str, version: str, max_queue: int) -> None: ...

    def inference_overloaded(self, model: str, version: str) -> None: ...

    def inference_workers_changed(self, alive: int, busy: int) -> None: ...

    def inference_worker_restarted(self) -> None: ...
