"""The operation hook's bookkeeping when the garbage collector finalises an abandoned one."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from backend.core.metrics import Metrics
from backend.graphql.extensions import OperationObservability


class _NoReentry:
    """A lock that fails, instead of waiting forever, when its holder takes it again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = False

    def __enter__(self) -> None:
        if self.held:
            raise RuntimeError("re-entered a metric's lock: this thread would wait forever")
        self._lock.acquire()
        self.held = True

    def __exit__(self, *_: Any) -> None:
        self.held = False
        self._lock.release()


def _hook(metrics: Metrics) -> Any:
    state = SimpleNamespace(metrics=metrics, tracer_provider=TracerProvider())
    context = SimpleNamespace(
        context=SimpleNamespace(state=state),
        operation_name="Late",
        graphql_document=None,  # "unknown" kind: no document needed
        result=None,
    )
    return OperationObservability(execution_context=context).on_operation()  # type: ignore[arg-type]


async def test_an_abandoned_operation_closed_inside_a_metric_lock_records_afterwards() -> None:
    # The garbage collector may finalise a dropped subscription's hook inside any allocation,
    # even while this thread holds a metric's lock (seen in CI: prometheus_client creating a
    # child in `labels()`): the hook must not take that lock again there.
    metrics = Metrics()
    lock = _NoReentry()
    metrics.graphql_latency._lock = lock  # the lock `labels()` takes
    operation = _hook(metrics)
    next(operation)  # started, then abandoned
    with lock:
        operation.close()  # what finalisation does
    await asyncio.sleep(0)  # the deferred bookkeeping runs from the loop
    await asyncio.sleep(0)
    sample = metrics.registry.get_sample_value(
        "sightline_graphql_operations_total",
        {"operation": "Late", "type": "unknown", "outcome": "ok"},
    )
    assert sample == 1.0
    count = metrics.registry.get_sample_value(
        "sightline_graphql_operation_duration_seconds_count",
        {"operation": "Late", "type": "unknown"},
    )
    assert count == 1.0


async def test_a_finished_operation_records_at_once() -> None:
    metrics = Metrics()
    operation = _hook(metrics)
    next(operation)
    for _ in operation:  # finishes normally: no GeneratorExit
        pass
    sample = metrics.registry.get_sample_value(
        "sightline_graphql_operations_total",
        {"operation": "Late", "type": "unknown", "outcome": "ok"},
    )
    assert sample == 1.0
