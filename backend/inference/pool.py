"""The inference pool: worker processes that own a device each, and a dynamic batcher per model
in the serving process, so heavy work never runs on the event loop.

- Items (one input each) queue per model, live frames ahead of batch jobs; a batch leaves when
  it is full or when its oldest item has waited the model's `max_delay_ms` (cut to a preferred
  size when the model has some). A cancelled item is dropped before its batch is formed.
- A queue at its model's `max_queue` refuses new items at once (`Overloaded`), so latency stays
  bounded instead of growing without limit.
- A batch that runs out of memory is split in halves and tried again, down to single items;
  a batch that raises anything else runs again item by item. Either way only an item that
  fails alone fails (`OUT_OF_MEMORY`, `INFERENCE_FAILED`), and the worker goes on.
- A worker that dies fails its running batch (`WorkerLost`) and is replaced; queued items wait
  for the replacement.
- Models load in the workers, asynchronously, with a warm-up run; a model is served once one
  worker has it warm. Requests to a loading model wait for it.
- Messages to a worker leave through its sender thread, never on the event loop; a batch of
  arrays of one shape travels through the worker's shared-memory slab (`_transport.py`). A
  worker holds `in_flight` batches at once (1 by default: 2 lets the next batch travel while one
  runs, but its items can no longer be withdrawn, and a live frame may wait behind both).

Needs only the standard library, numpy and what the runtimes import (torch, onnxruntime).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from backend.inference._transport import Sender, Slab, SlabReader
from backend.inference.client import (
    ERRORS,
    InferenceError,
    InferenceMetrics,
    ModelState,
    ModelStatus,
    ModelUnavailable,
    Overloaded,
    Priority,
    WorkerLost,
)
from backend.inference.manifest import ModelManifest

log = logging.getLogger(__name__)


# -- the worker process ----------------------------------------------------------------------


def _warm_input(manifest: ModelManifest) -> Any | None:
    import numpy as np

    if "warm" in manifest.input:
        return np.asarray(manifest.input["warm"], dtype=np.float32)
    if manifest.runtime == "cascade":
        return np.zeros((64, 64), dtype=np.uint8)
    if manifest.runtime == "opencv-dnn" or (
        manifest.runtime == "torchvision" and manifest.task == "detection"
    ):
        width, height = (
            int(manifest.input.get("width", 300)),
            int(manifest.input.get("height", 300)),
        )
        return np.zeros((height, width, 3), dtype=np.uint8)
    size = manifest.input.get("size")
    if size:
        return np.zeros((3, int(size), int(size)), dtype=np.float32)
    return None


def _run_split(fn: Any, inputs: list[Any]) -> list[tuple[str, Any]]:
    """Runs a batch; on out-of-memory, each half on its own (down to single items); on any
    other error, each item alone, so that only the items that fail alone fail."""
    from backend.inference.runtimes import out_of_memory

    try:
        outputs = list(fn(inputs))
        if len(outputs) != len(inputs):
            raise RuntimeError(f"the model returned {len(outputs)} outputs for {len(inputs)}")
        return [("ok", o) for o in outputs]
    except Exception as exc:
        if out_of_memory(exc):
            _release_memory()
            if len(inputs) == 1:
                return [("err", "OUT_OF_MEMORY", str(exc))]
            half = len(inputs) // 2
            return _run_split(fn, inputs[:half]) + _run_split(fn, inputs[half:])
        if len(inputs) == 1:
            return [("err", "INFERENCE_FAILED", f"{type(exc).__name__}: {exc}")]
        # One bad image must not fail its batch-mates: each runs again alone (at most
        # `max_batch` more calls), and only those that fail alone fail.
        return [result for item in inputs for result in _run_split(fn, [item])]


def _release_memory() -> None:
    import sys

    torch = sys.modules.get("torch")  # only a worker that runs torch models has it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _worker_main(conn: Connection, device: str, threads: int, parent_pid: int) -> None:
    from backend.inference.lifeline import die_with_parent
    from backend.inference.manifest import ModelManifest as Manifest
    from backend.inference.runtimes import load
    from backend.inference.worker_output import log_worker_output

    die_with_parent(parent_pid)  # a server killed with SIGKILL leaves no worker behind
    log_worker_output(__name__)  # what loaders print ("Loaded pretrained weights...") is logged

    models: dict[str, Any] = {}
    slabs = SlabReader(device)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "load":
            manifest = Manifest.from_dict(message[1])
            started = time.perf_counter()
            try:
                fn = load(manifest, device, threads)
                warm = _warm_input(manifest)
                if warm is not None:
                    fn([warm])
                models[manifest.name] = fn
                conn.send(("loaded", manifest.name, None, time.perf_counter() - started))
            except Exception as exc:
                conn.send(("loaded", manifest.name, f"{type(exc).__name__}: {exc}", 0.0))
        elif kind == "run":
            _, batch_id, name, packed = message
            inputs = slabs.unpack(packed)  # views of the slab where the batch came through it
            fn = models.get(name)
            started = time.perf_counter()
            if fn is None:
                results = [("err", "MODEL_UNAVAILABLE", f"{name} not loaded")] * len(inputs)
            else:
                results = _run_split(fn, inputs)
            del inputs  # the slab takes the next batch once this reply is read
            conn.send(("done", batch_id, results, time.perf_counter() - started))


# -- the serving process ---------------------------------------------------------------------


@dataclass
class _Item:
    value: Any
    future: asyncio.Future[Any]
    enqueued: float


@dataclass
class _Queue:
    state: ModelState
    lanes: tuple[deque[_Item], deque[_Item]] = field(default_factory=lambda: (deque(), deque()))
    grew: asyncio.Event = field(default_factory=asyncio.Event)
    last_arrival: float = 0.0
    gap: float = float("inf")  # moving average of the time between arrivals

    def arrived(self, now: float) -> None:
        if self.last_arrival:
            gap = now - self.last_arrival
            self.gap = gap if self.gap == float("inf") else 0.8 * self.gap + 0.2 * gap
        self.last_arrival = now

    def __len__(self) -> int:
        return len(self.lanes[0]) + len(self.lanes[1])

    def prune(self) -> None:
        for lane in self.lanes:
            while lane and lane[0].future.done():
                lane.popleft()

    def oldest(self) -> float:
        self.prune()
        heads = [lane[0].enqueued for lane in self.lanes if lane]
        return min(heads) if heads else time.monotonic()

    def take(self, limit: int) -> list[_Item]:
        taken: list[_Item] = []
        for lane in self.lanes:  # live first
            while lane and len(taken) < limit:
                item = lane.popleft()
                if not item.future.done():  # cancelled items leave before the batch runs
                    taken.append(item)
        return taken


class _Worker:
    def __init__(self, pool: InferencePool, index: int) -> None:
        self.index = index
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        # before the process starts, which then shares this process's resource tracker
        slab = Slab(pool.slab_bytes, pool.in_flight)
        self.process = context.Process(
            target=_worker_main,
            args=(child, pool.device, pool.threads, os.getpid()),
            name=f"sightline-inference-{index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.loaded: set[str] = set()
        self.pending_loads: set[str] = set()
        self.running: dict[int, list[_Item]] = {}
        self.alive = True
        loop = asyncio.get_running_loop()
        self.sender = Sender(
            self.conn, slab, f"sightline-inference-send-{index}", lambda: self._notify(loop, pool)
        )
        self.reader = threading.Thread(target=self._read, args=(pool, loop), daemon=True)
        self.reader.start()

    def _notify(self, loop: asyncio.AbstractEventLoop, pool: InferencePool) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first
            loop.call_soon_threadsafe(pool._lost, self)

    def _read(self, pool: InferencePool, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self._notify(loop, pool)
                return
            if message[0] == "done":
                self.sender.slab.release(message[1])
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(pool._received, self, message)

    def send(self, message: tuple[Any, ...]) -> bool:
        """Queues the message for the sender thread (a `run` message's inputs travel through
        the slab where they can); False once the worker is retired."""
        return self.sender.send(message)


class InferencePool:
    """An `InferenceClient` on local worker processes."""

    def __init__(
        self,
        manifests: Sequence[ModelManifest],
        *,
        workers: int = 1,
        device: str = "cpu",
        threads: int = 1,
        max_restarts: int = 20,
        metrics: InferenceMetrics | None = None,
        slab_bytes: int = 64 * 2**20,
        in_flight: int = 1,
    ) -> None:
        self.device = device
        self.threads = threads
        self.slab_bytes = slab_bytes  # shared memory per batch a worker holds (0: the pipe only)
        # batches a worker holds at once: with 2 the next one travels while one runs, but its
        # items can no longer be withdrawn, and a live frame may wait behind both
        self.in_flight = in_flight
        self._size = workers
        self._max_restarts = max_restarts
        self._metrics = metrics
        self._manifests = {m.name: m for m in manifests}
        self._states: dict[str, ModelState] = {}
        self._queues: dict[str, _Queue] = {}
        self._workers: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._dispatchers: list[asyncio.Task[None]] = []
        self._ids = itertools.count()
        self._waits: dict[int, list[float]] = {}
        self._batch_models: dict[int, ModelManifest] = {}
        self._restarts = 0
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the workers; models load in the background (see `status`)."""
        for name, manifest in self._manifests.items():
            state = ModelState(manifest)
            self._states[name] = state
            self._queues[name] = _Queue(state)
            self._dispatchers.append(
                asyncio.create_task(self._dispatch(self._queues[name]), name=f"batcher-{name}")
            )
            if self._metrics is not None:
                self._metrics.inference_capacity(name, manifest.version, manifest.max_queue)
        for index in range(self._size):
            self._spawn(index)
        self._workers_changed()

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Waits until every model is warm or has failed to load."""
        async with asyncio.timeout(timeout_s):
            for state in self._states.values():
                await state.ready.wait()

    async def warmed(self, model: str) -> None:
        """Waits until `model` is loaded and has run its warm-up on a worker; raises
        ModelUnavailable, saying why, where it failed to."""
        state = self._states[model]
        await state.ready.wait()
        if state.status is ModelStatus.FAILED:
            raise ModelUnavailable(f"{model} failed to load: {state.error}")

    def _spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        self._workers.append(worker)
        for manifest in self._manifests.values():
            worker.pending_loads.add(manifest.name)
            worker.send(("load", manifest.to_dict()))

    async def close(self, grace_s: float = 5.0) -> None:
        self._closed = True
        for task in self._dispatchers:
            task.cancel()
        await asyncio.gather(*self._dispatchers, return_exceptions=True)
        for queue in self._queues.values():
            for item in queue.take(len(queue)):
                item.future.set_exception(ModelUnavailable("the inference pool is shutting down"))
        for worker in self._workers:
            worker.send(("stop",))
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            await asyncio.to_thread(worker.process.join, max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
            worker.sender.retire()  # the sender thread closes the pipe and frees the slab
            await asyncio.to_thread(worker.sender.join, max(1.0, deadline - time.monotonic()))
        for worker in self._workers:
            self._fail_running(worker, ModelUnavailable("the inference pool is shutting down"))

    # -- the client interface ------------------------------------------------------------------

    def manifest(self, model: str) -> ModelManifest:
        if model not in self._manifests:
            serving = ", ".join(sorted(self._manifests)) or "none"
            raise ModelUnavailable(f"no model named {model!r} (models: {serving})")
        return self._manifests[model]

    def manifests(self) -> list[ModelManifest]:
        return list(self._manifests.values())

    def status(self) -> dict[str, ModelState]:
        return dict(self._states)

    async def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        priority: Priority = Priority.BATCH,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """One output per input. Raises Overloaded, ModelUnavailable, WorkerLost, OutOfMemory,
        InferenceError, or TimeoutError after `timeout_s` (the items are then withdrawn)."""
        queue = self._queues.get(model)
        if queue is None:
            raise ModelUnavailable(f"no model named {model!r}")
        state = queue.state
        if state.status is ModelStatus.FAILED:
            raise ModelUnavailable(f"{model} failed to load: {state.error}")
        if len(queue) + len(inputs) > state.manifest.max_queue:
            if self._metrics is not None:
                self._metrics.inference_overloaded(model, state.manifest.version)
            raise Overloaded(f"{model} has {len(queue)} items queued")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(value, loop.create_future(), now) for value in inputs]
        queue.lanes[0 if priority is Priority.LIVE else 1].extend(items)
        queue.arrived(now)
        queue.grew.set()
        if self._metrics is not None:
            self._metrics.inference_queue(model, state.manifest.version, len(queue))
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for item in items:  # cancelled or timed out: leave the queue
                if not item.future.done():
                    item.future.cancel()

    # -- batching ------------------------------------------------------------------------------

    async def _dispatch(self, queue: _Queue) -> None:
        state = queue.state
        manifest = state.manifest
        delay = manifest.max_delay_ms / 1000
        while True:
            queue.prune()
            if not len(queue):
                queue.grew.clear()
                await queue.grew.wait()
                continue
            await state.ready.wait()
            if state.status is ModelStatus.FAILED:
                for item in queue.take(len(queue)):
                    item.future.set_exception(ModelUnavailable(f"{manifest.name}: {state.error}"))
                continue
            # wait for the batch to fill, at most until the oldest item's delay is up, and only
            # while items arrive faster than that (a lone client would wait for nobody)
            while len(queue) < manifest.max_batch and queue.gap < delay:
                remaining = queue.oldest() + delay - time.monotonic()
                if remaining <= 0:
                    break
                queue.grew.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await queue.grew.wait()
            worker = await self._idle_worker(manifest.name)
            limit = _batch_size(len(queue), manifest)
            items = queue.take(limit)
            if not items:
                self._idle.put_nowait(worker)
                continue
            batch_id = next(self._ids)
            worker.running[batch_id] = items
            state.batches += 1
            state.items += len(items)
            if self._metrics is not None:
                now = time.monotonic()
                self._waits[batch_id] = [now - i.enqueued for i in items]
                self._batch_models[batch_id] = manifest
                self._metrics.inference_queue(manifest.name, manifest.version, len(queue))
            self._workers_changed()
            if not worker.send(("run", batch_id, manifest.name, [i.value for i in items])):
                self._lost(worker)
            elif len(worker.running) < self.in_flight:
                self._idle.put_nowait(worker)  # it can take another while this one runs

    async def _idle_worker(self, model: str) -> _Worker:
        while True:
            worker = await self._idle.get()
            if worker.alive and model in worker.loaded:
                return worker
            if worker.alive:  # cannot serve this model: let another batcher have it
                self._idle.put_nowait(worker)
                await asyncio.sleep(0.001)

    # -- messages from workers -----------------------------------------------------------------

    def _received(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        if message[0] == "loaded":
            self._loaded(worker, *message[1:])
        elif message[0] == "done":
            self._done(worker, *message[1:])

    def _loaded(self, worker: _Worker, name: str, error: str | None, seconds: float) -> None:
        worker.pending_loads.discard(name)
        state = self._states[name]
        if error is None:
            worker.loaded.add(name)
            if state.status is not ModelStatus.READY:
                log.info("model %s ready (%.2f s on worker %d)", name, seconds, worker.index)
            state.status, state.error = ModelStatus.READY, None
        elif state.status is not ModelStatus.READY:
            log.error("model %s failed to load: %s", name, error)
            state.status, state.error = ModelStatus.FAILED, error
        state.ready.set()
        if not worker.pending_loads:
            self._idle.put_nowait(worker)

    def _done(
        self, worker: _Worker, batch_id: int, results: list[tuple[Any, ...]], run_s: float
    ) -> None:
        ran = worker.running.pop(batch_id, None)
        items = ran or []
        waits = self._waits.pop(batch_id, None)
        manifest = self._batch_models.pop(batch_id, None)
        if self._metrics is not None and waits is not None and manifest is not None and items:
            self._metrics.inference_batch(manifest.name, manifest.version, len(items), waits, run_s)
        for item, result in zip(items, results, strict=False):
            if item.future.done():
                continue  # cancelled while it ran
            if result[0] == "ok":
                item.future.set_result(result[1])
            else:
                item.future.set_exception(ERRORS.get(result[1], InferenceError)(result[2]))
        if worker.alive and ran is not None and len(worker.running) == self.in_flight - 1:
            self._idle.put_nowait(worker)  # it was full (else it is in the idle queue already)
        self._workers_changed()

    def _lost(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        worker.sender.retire()  # its slab's name goes now, the pipe once the queue is written
        if self._closed:  # it was told to stop
            return
        code = worker.process.exitcode
        log.error("inference worker %d died (exit code %s)", worker.index, code)
        self._fail_running(worker, WorkerLost(f"the inference worker died (exit code {code})"))
        if worker in self._workers:
            self._workers.remove(worker)
        if self._closed:
            return
        if self._restarts >= self._max_restarts:
            log.error("inference worker restarts exhausted (%d)", self._restarts)
            self._workers_changed()
            return
        self._restarts += 1
        self._spawn(worker.index)
        if self._metrics is not None:
            self._metrics.inference_worker_restarted()
        self._workers_changed()

    def _workers_changed(self) -> None:
        if self._metrics is not None:
            alive = [w for w in self._workers if w.alive]
            self._metrics.inference_workers_changed(len(alive), sum(1 for w in alive if w.running))

    def _fail_running(self, worker: _Worker, error: InferenceError) -> None:
        for batch_id in worker.running:
            self._waits.pop(batch_id, None)
            self._batch_models.pop(batch_id, None)
        for items in worker.running.values():
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
        worker.running.clear()


def _batch_size(queued: int, manifest: ModelManifest) -> int:
    """The batch to run now: as many as allowed, or the largest preferred size that fits."""
    limit = min(queued, manifest.max_batch)
    fitting = [size for size in manifest.preferred_batch if size <= limit]
    return max(fitting) if fitting else limit
