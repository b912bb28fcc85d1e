"""The remote runtime's parts that need no server: the circuit breaker, and a service that is
not there (typed errors, never a hang)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from backend.inference.catalog import Task
from backend.inference.client import ModelStatus, ModelUnavailable
from backend.inference.manifest import ModelManifest
from backend.inference.remote import CircuitBreaker, RemoteInference
from tests.conftest import free_port, scaled

CLASSIFIER = ModelManifest(
    name="c", version="1", task=Task.CLASSIFICATION, runtime="onnx", weights="w.onnx",
    input={"size": 8}, labels=("a", "b"),
)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_failures_in_a_row_and_closes_on_a_trial() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, reset_s=5.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    breaker.succeeded()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.open
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.allow()  # half-open: one trial
    assert not breaker.allow()  # and only one at a time
    breaker.failed()  # the trial failed: open again for reset_s
    assert not breaker.allow()
    clock.now = 10.0
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.open
    assert breaker.allow()


async def test_models_of_a_service_that_is_not_there_are_unavailable() -> None:
    remote = RemoteInference([CLASSIFIER], f"127.0.0.1:{free_port()}", ready_poll_s=0.05)
    await remote.start()
    try:
        await asyncio.sleep(0.2)  # a few polls of the model-ready endpoint: refused
        assert remote.status()["c"].status is ModelStatus.LOADING
        with pytest.raises(ModelUnavailable, match="not ready"):
            await remote.infer("c", [np.zeros((3, 8, 8), np.float32)], timeout_s=scaled(10))
        with pytest.raises(ModelUnavailable, match="no model named"):
            await remote.infer("nope", [np.zeros((3, 8, 8), np.float32)])
        with pytest.raises(ModelUnavailable, match="no version"):
            remote.manifest("c", "2")
    finally:
        await remote.close()
    assert not remote._watches  # the readiness watches are owned and cancelled
