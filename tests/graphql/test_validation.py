"""A document's validation budget counts the CPU its validation used, not the garbage
collections that happened to run in its thread (their cost is the whole process's)."""

from __future__ import annotations

import threading
import time

from backend.graphql import validation


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_collections_in_the_validation_thread_do_not_count() -> None:
    seen: dict[str, float] = {}

    def job() -> None:
        burn(0.05)  # the document's own work
        validation._gc_timer("start", {})  # a collection runs in this thread...
        burn(0.3)
        validation._gc_timer("stop", {})  # ...and ends
        seen["during"] = task.cpu_seconds()

    task = validation._Interruptible(job)
    worker = threading.Thread(target=task.run)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert 0.04 <= seen["during"] < 0.25  # the 0.3 s in the collector is not the document's
