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
- Several versions of a model serve at once, each with its own batcher, keyed by name and
  version (`infer(..., version=)`; none: the name's default version). `add` loads and warms a
  version in every worker, off their serving thread, and resolves once all have it (a worker
  started later loads it too); `remove` refuses new items for a version, lets its queued and
  running ones finish, then has every worker unload it and free its memory.
- Messages to a worker leave through its sender thread, never on the event loop; a batch of
  arrays of one shape travels through the worker's shared-memory slab (`_transport.py`). A
  worker holds `in_flight` batches at once (1 by default: 2 lets the next batch travel while one
  runs, but its items can no longer be withdrawn, and a live frame may wait behind both).

Needs only the standard library, numpy and what the runtimes import (torch, onnxruntime).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from queue import SimpleQueue
from typing import Any

from backend.inference._transport import Sender, Slab, SlabReader
from backend.inference.client import (
    ERRORS,
    ITEM_TIMINGS,
    InferenceError,
    InferenceMetrics,
    ItemTiming,
    ModelState,
    ModelStatus,
    ModelUnavailable,
    Overloaded,
    Priority,
    WorkerLost,
)
from backend.inference.manifest import ModelManifest

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005  # a worker's GIL switch interval (Python's default: 5 ms)


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
    torch = sys.modules.get("torch")  # only a worker that runs torch models has it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _worker_main(conn: Connection, device: str, threads: int, parent_pid: int) -> None:
    from backend.inference.lifeline import die_with_parent
    from backend.inference.worker_output import log_worker_output

    die_with_parent(parent_pid)  # a server killed with SIGKILL leaves no worker behind
    log_worker_output(__name__)  # what loaders print ("Loaded pretrained weights...") is logged
    # While a version loads on the loader thread, the serving thread gets the GIL back within
    # this interval whenever it wants it (every numpy or torch call gives it up and takes it
    # again): at the default 5 ms, a batch's latency grew several times during a load.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    models: dict[str, Any] = {}  # by wire key, "name@version"
    sending = threading.Lock()  # the loader thread answers too

    def send(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send(message)

    # Loads and unloads run one at a time on a thread of their own, so a version that loads
    # (seconds for a real model) does not stop the versions already here from serving.
    changes: SimpleQueue[tuple[Any, ...] | None] = SimpleQueue()
    loader = threading.Thread(
        target=_model_changes,
        args=(changes, models, send, device, threads),
        name="sightline-model-loader",
        daemon=True,
    )
    loader.start()
    slabs = SlabReader(device)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind in ("load", "unload"):
            changes.put(message)
        elif kind == "models":
            send(("models", message[1], sorted(models)))
        elif kind == "run":
            _, batch_id, key, packed = message
            inputs = slabs.unpack(packed)  # views of the slab where the batch came through it
            fn = models.get(key)
            started = time.perf_counter()
            if fn is None:
                results = [("err", "MODEL_UNAVAILABLE", f"{key} not loaded")] * len(inputs)
            else:
                results = _run_split(fn, inputs)
            del inputs  # the slab takes the next batch once this reply is read
            send(("done", batch_id, results, time.perf_counter() - started))


def _model_changes(
    changes: SimpleQueue[tuple[Any, ...] | None],
    models: dict[str, Any],
    send: Any,
    device: str,
    threads: int,
) -> None:
    """The worker's loader thread: loads and warms versions, unloads them, in arrival order."""
    from backend.inference.manifest import ModelManifest as Manifest
    from backend.inference.runtimes import load

    # Loads run at a lower priority than the batches beside them (bench/model_swap.py: p99
    # while loading 1.5-1.8x steady state without, 1.1x with). The threads a runtime starts
    # while it loads (onnxruntime's, OpenCV's and torch's pools, with more than one thread)
    # would inherit it for good, and the version's batches would then run behind everything
    # else on a busy machine: they are put back where the process may (root or
    # CAP_SYS_NICE), and elsewhere loads run at a lower priority only with one thread.
    restore = _lower_priority(threads)
    while (message := changes.get()) is not None:
        if message[0] == "unload":
            key = message[1]
            fn = models.pop(key, None)
            # Freed as its last reference goes (a batch running it holds one until it ends);
            # no gc.collect(): with torch imported a full collection holds the GIL for a few
            # hundred milliseconds, stalling the batches of the versions that keep serving.
            del fn
            _release_memory()
            send(("unloaded", key, sorted(models)))
            continue
        manifest = Manifest.from_dict(message[1])
        key = wire_key(manifest.name, manifest.version)
        started = time.perf_counter()
        try:
            with _collector_paused(), _new_threads_restored(restore):
                fn = load(manifest, device, threads)
                warm = _warm_input(manifest)
                if warm is not None:
                    fn([warm])
            models[key] = fn
            send(("loaded", key, None, time.perf_counter() - started))
        except Exception as exc:
            send(("loaded", key, f"{type(exc).__name__}: {exc}", 0.0))


LOADER_NICE = 10  # a worker's loader thread: behind the batches of its serving thread


def _lower_priority(threads: int) -> bool:
    """Lowers the calling (loader) thread's priority where what it starts can run at full
    priority; True when threads started during a load must be put back (see
    `_new_threads_restored`)."""
    if not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):
        return False
    restorable = _can_raise_priority()
    if threads > 1 and not restorable:
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except OSError:
        return False
    return restorable and threads > 1


def _can_raise_priority() -> bool:
    """Whether this process may give a thread back its priority after lowering it (root, or
    CAP_SYS_NICE), tried on a thread of its own."""
    found: list[bool] = []

    def attempt() -> None:
        me = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, me, LOADER_NICE)
            os.setpriority(os.PRIO_PROCESS, me, 0)
            found.append(True)
        except OSError:
            found.append(False)

    trial = threading.Thread(target=attempt, name="sightline-priority-check", daemon=True)
    trial.start()
    trial.join()
    return bool(found and found[0])


@contextlib.contextmanager
def _new_threads_restored(restore: bool) -> Iterator[None]:
    """With `restore`, the threads the block starts (a runtime's pools) get the normal
    priority back after it: they run the version's batches."""
    if not restore:
        yield
        return
    before = set(os.listdir("/proc/self/task"))
    try:
        yield
    finally:
        for tid in set(os.listdir("/proc/self/task")) - before:
            with contextlib.suppress(OSError):  # ended meanwhile
                os.setpriority(os.PRIO_PROCESS, int(tid), 0)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No automatic cycle collection while a version loads, and what it built (its modules,
    weights, caches) frozen out of later ones once it has loaded.

    A load allocates hundreds of thousands of objects; with the collector on, a full
    collection ran during it and walked every object of the process holding the GIL, and the
    batches of the versions serving beside it took twice as long (bench/model_swap.py: p99
    while loading 2.2-2.3x steady state before, 1.5-1.8x with this alone). Frozen objects
    are still freed by reference counting when their version unloads; what such a version
    leaves in reference cycles stays (measured: about 1 MB per swap of efficientnet-lite0).
    A load that fails is not frozen: its garbage is collected as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    loaded = False
    try:
        yield
        loaded = True
    finally:
        if loaded:
            gc.freeze()
        if was_enabled:
            gc.enable()


def wire_key(name: str, version: str) -> str:
    """How workers name a version of a model."""
    return f"{name}@{version}"


# -- the serving process ---------------------------------------------------------------------


@dataclass
class _Item:
    value: Any
    future: asyncio.Future[Any]
    enqueued: float
    dispatched: float = 0.0
    done: float = 0.0
    batch_size: int = 0
    compute_s: float = 0.0


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
        self.loaded: set[str] = set()  # wire keys
        self.pending_loads: set[str] = set()
        self.serving = False  # it joins the idle rotation once its first loads are done
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


Key = tuple[str, str]  # (name, version)


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
        unload_timeout_s: float = 30.0,
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
        self._unload_timeout_s = unload_timeout_s
        first = {m.name: m for m in manifests}  # one version a name at start (the last given)
        self._manifests: dict[Key, ModelManifest] = {(m.name, m.version): m for m in first.values()}
        self._defaults: dict[str, str] = {m.name: m.version for m in first.values()}
        self._states: dict[Key, ModelState] = {}
        self._queues: dict[Key, _Queue] = {}
        self._workers: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._dispatchers: dict[Key, asyncio.Task[None]] = {}
        self._ids = itertools.count()
        self._waits: dict[int, list[float]] = {}
        self._batch_models: dict[int, ModelManifest] = {}
        self._running_keys: dict[int, Key] = {}  # batch id -> the version it runs
        self._adding: dict[Key, asyncio.Future[None]] = {}
        self._changed = asyncio.Event()  # a load, an unload, a batch or a worker changed
        self._replies: dict[int, asyncio.Future[list[str]]] = {}
        self._restarts = 0
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the workers; models load in the background (see `status`)."""
        for key, manifest in self._manifests.items():
            self._serve(key, manifest)
        for index in range(self._size):
            self._spawn(index)
        self._workers_changed()

    def _serve(self, key: Key, manifest: ModelManifest) -> ModelState:
        """A version's state, queue and batcher."""
        state = ModelState(manifest)
        self._states[key] = state
        self._queues[key] = _Queue(state)
        self._dispatchers[key] = asyncio.create_task(
            self._dispatch(self._queues[key]), name=f"batcher-{wire_key(*key)}"
        )
        if self._metrics is not None:
            self._metrics.inference_capacity(manifest.name, manifest.version, manifest.max_queue)
        return state

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Waits until every model is warm or has failed to load."""
        async with asyncio.timeout(timeout_s):
            for state in list(self._states.values()):
                await state.ready.wait()

    async def warmed(self, model: str) -> None:
        """Waits until `model` is loaded and has run its warm-up on a worker; raises
        ModelUnavailable, saying why, where it failed to."""
        state = self._states[(model, self._defaults[model])]
        await state.ready.wait()
        if state.status is ModelStatus.FAILED:
            raise ModelUnavailable(f"{model} failed to load: {state.error}")

    def _spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        self._workers.append(worker)
        for key, manifest in self._manifests.items():
            if self._states[key].status is ModelStatus.DRAINING:
                continue
            worker.pending_loads.add(wire_key(*key))
            worker.send(("load", manifest.to_dict()))
        if not worker.pending_loads:
            worker.serving = True
            self._idle.put_nowait(worker)

    async def close(self, grace_s: float = 5.0) -> None:
        self._closed = True
        for task in self._dispatchers.values():
            task.cancel()
        await asyncio.gather(*self._dispatchers.values(), return_exceptions=True)
        for queue in self._queues.values():
            for item in queue.take(len(queue)):
                item.future.set_exception(ModelUnavailable("the inference pool is shutting down"))
        self._changed.set()  # versions being added give up
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(ModelUnavailable("the inference pool is shutting down"))
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

    # -- versions ------------------------------------------------------------------------------

    async def add(self, manifest: ModelManifest, *, timeout_s: float | None = None) -> None:
        """Loads and warms a version in every worker (and in those started later); returns
        once every worker has it. Raises ModelUnavailable, saying why, when a worker fails to
        load it or `timeout_s` passes: the version is then dropped everywhere and what serves
        is unchanged. Adding a version already here (or being added) waits for it."""
        key = (manifest.name, manifest.version)
        if key in self._adding:
            await asyncio.shield(self._adding[key])
            return
        state = self._states.get(key)
        if state is not None:
            if state.status is ModelStatus.DRAINING:
                raise ModelUnavailable(f"{wire_key(*key)} is being removed; add it again later")
            if state.status is not ModelStatus.FAILED:
                await state.ready.wait()
                if state.status is not ModelStatus.FAILED:
                    return
            if self._defaults.get(manifest.name) == manifest.version:
                raise ModelUnavailable(f"{wire_key(*key)} failed to load at start: {state.error}")
            self._discard(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._adding[key] = done
        self._manifests[key] = manifest
        state = self._serve(key, manifest)
        wire = wire_key(*key)
        for worker in self._workers:
            if worker.alive:
                worker.pending_loads.add(wire)
                worker.send(("load", manifest.to_dict()))
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                while (error := self._add_verdict(key, state)) is not None and not error:
                    self._changed.clear()
                    await self._changed.wait()
        except BaseException as exc:
            error = "timed out" if isinstance(exc, TimeoutError) else "cancelled"
            self._failed_add(key, error, done)
            if isinstance(exc, TimeoutError):
                raise ModelUnavailable(f"{wire} did not load within {timeout_s} s") from None
            raise
        if error is not None:
            self._failed_add(key, error, done)
            raise ModelUnavailable(f"{wire} failed to load: {error}")
        del self._adding[key]
        state.status, state.error = ModelStatus.READY, None
        state.ready.set()
        done.set_result(None)
        log.info("model %s ready in every worker (%.2f s)", wire, time.monotonic() - started)

    def _add_verdict(self, key: Key, state: ModelState) -> str | None:
        """While adding: "" to wait, an error, or None once every live worker has it."""
        if state.error is not None:
            return state.error
        if self._closed:
            return "the inference pool is shutting down"
        wire = wire_key(*key)
        alive = [w for w in self._workers if w.alive]
        if not alive:
            return "" if self._restarts < self._max_restarts else "no inference worker is left"
        return None if all(wire in w.loaded for w in alive) else ""

    def _failed_add(self, key: Key, error: str, done: asyncio.Future[None]) -> None:
        log.error("model %s failed to load: %s", wire_key(*key), error)
        self._adding.pop(key, None)
        self._discard(key)
        if not done.done():
            done.set_exception(ModelUnavailable(f"{wire_key(*key)} failed to load: {error}"))
            done.exception()  # retrieved: only waiters that came later see it

    def _discard(self, key: Key) -> None:
        """Forgets a version at once: its queued items fail, every worker unloads it."""
        state = self._states.pop(key, None)
        self._manifests.pop(key, None)
        task = self._dispatchers.pop(key, None)
        if task is not None:
            task.cancel()
        queue = self._queues.pop(key, None)
        if queue is not None:
            for item in queue.take(len(queue)):
                item.future.set_exception(ModelUnavailable(f"{wire_key(*key)} is not served"))
        if state is not None:
            state.ready.set()
        wire = wire_key(*key)
        for worker in self._workers:
            worker.loaded.discard(wire)
            self._load_settled(worker, wire)
            if worker.alive:
                worker.send(("unload", wire))

    async def remove(self, model: str, version: str, *, grace_s: float = 30.0) -> None:
        """Retires a version: new items are refused at once (ModelUnavailable); its queued and
        running ones have `grace_s` to finish (those still queued then fail); then every
        worker unloads it and frees its memory. The default version of a name that has others
        cannot be removed (`set_default` another first). Removing what is not here does
        nothing."""
        key = (model, version)
        state = self._states.get(key)
        if state is None or state.status is ModelStatus.DRAINING:
            return
        others = [v for (name, v) in self._states if name == model and v != version]
        if self._defaults.get(model) == version:
            if others:
                raise ModelUnavailable(
                    f"{wire_key(*key)} is the default version of {model}; make another the "
                    "default first"
                )
            del self._defaults[model]
        if key in self._adding:  # still loading: it fails to load
            state.error = "removed while it loaded"
            self._changed.set()
            with contextlib.suppress(ModelUnavailable):
                await asyncio.shield(self._adding[key])
            return
        state.status = ModelStatus.DRAINING
        queue = self._queues[key]
        wire = wire_key(*key)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                while len(queue) or any(self._runs(w, key) for w in self._workers):
                    self._changed.clear()
                    await self._changed.wait()
        for item in queue.take(len(queue)):
            item.future.set_exception(ModelUnavailable(f"{wire} was retired"))
        self._manifests.pop(key, None)
        self._states.pop(key, None)
        self._queues.pop(key, None)
        task = self._dispatchers.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        holding = [w for w in self._workers if w.alive and wire in w.loaded]
        for worker in holding:
            worker.send(("unload", wire))  # after the batches it runs (its pipe keeps order)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._unload_timeout_s):
                while any(wire in w.loaded for w in holding if w.alive):
                    self._changed.clear()
                    await self._changed.wait()
        for worker in self._workers:
            worker.loaded.discard(wire)
        if self._metrics is not None:  # retired: no capacity, nothing queued
            self._metrics.inference_capacity(model, version, 0)
        log.info("model %s retired and unloaded", wire)

    def _runs(self, worker: _Worker, key: Key) -> bool:
        return any(self._running_keys.get(batch) == key for batch in worker.running)

    def set_default(self, model: str, version: str) -> None:
        """What `infer(model, ...)` without a version runs from now on (a ready version)."""
        state = self._states.get((model, version))
        if state is None or state.status is not ModelStatus.READY:
            raise ModelUnavailable(f"{wire_key(model, version)} is not ready here")
        if self._defaults.get(model) != version:
            log.info("model %s: version %s is the default now", model, version)
        self._defaults[model] = version

    def default_version(self, model: str) -> str | None:
        return self._defaults.get(model)

    def versions(self) -> dict[Key, ModelState]:
        """Every version here, by (name, version): loading, ready, failed or draining."""
        return dict(self._states)

    async def worker_models(self, timeout_s: float = 10.0) -> list[list[str]]:
        """What each live worker process holds now, by its own account ("name@version")."""
        loop = asyncio.get_running_loop()
        asks = []
        for worker in self._workers:
            if worker.alive:
                request = next(self._ids)
                reply: asyncio.Future[list[str]] = loop.create_future()
                self._replies[request] = reply
                asks.append(reply)
                worker.send(("models", request))
        async with asyncio.timeout(timeout_s):
            return list(await asyncio.gather(*asks))

    # -- the client interface ------------------------------------------------------------------

    def manifest(self, model: str, version: str | None = None) -> ModelManifest:
        """A version's manifest (none: the default version's)."""
        if model not in self._defaults and not any(n == model for n, _ in self._states):
            serving = ", ".join(sorted({n for n, _ in self._states})) or "none"
            raise ModelUnavailable(f"no model named {model!r} (models: {serving})")
        state = self._states.get((model, version or self._defaults.get(model, "")))
        if state is None or state.status is ModelStatus.DRAINING:
            versions = ", ".join(m.version for m in self.manifests() if m.name == model)
            raise ModelUnavailable(
                f"{model} has no version {version!r} here (versions: {versions or 'none'})"
            )
        return state.manifest

    def manifests(self) -> list[ModelManifest]:
        """What can be asked for: each name's default version, and the other versions that
        are ready in every worker."""
        return [
            state.manifest
            for (name, version), state in self._states.items()
            if self._defaults.get(name) == version or state.status is ModelStatus.READY
        ]

    def status(self) -> dict[str, ModelState]:
        """Each name's default version (`versions` has them all)."""
        return {name: self._states[(name, v)] for name, v in self._defaults.items()}

    async def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        *,
        version: str | None = None,
        priority: Priority = Priority.BATCH,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """One output per input, by `version` of `model` (none: its default). Raises
        Overloaded, ModelUnavailable (also for a version being retired), WorkerLost,
        OutOfMemory, InferenceError, or TimeoutError after `timeout_s` (the items are then
        withdrawn)."""
        queue = self._queues.get((model, version or self._defaults.get(model, "")))
        if queue is None:
            if version is not None and any(n == model for n, _ in self._states):
                self.manifest(model, version)  # raises, naming the versions there are
            raise ModelUnavailable(f"no model named {model!r}")
        state = queue.state
        if state.status is ModelStatus.FAILED:
            raise ModelUnavailable(f"{model} failed to load: {state.error}")
        if state.status is ModelStatus.DRAINING:
            raise ModelUnavailable(f"{model}@{state.manifest.version} is being retired")
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
                outputs = list(await asyncio.gather(*(i.future for i in items)))
            timings = ITEM_TIMINGS.get()
            if timings is not None:
                version = state.manifest.version
                timings.extend(
                    ItemTiming(
                        model, version, i.enqueued, i.dispatched, i.done, i.batch_size, i.compute_s
                    )
                    for i in items
                )
            return outputs
        finally:
            for item in items:  # cancelled or timed out: leave the queue
                if not item.future.done():
                    item.future.cancel()

    # -- batching ------------------------------------------------------------------------------

    async def _dispatch(self, queue: _Queue) -> None:
        state = queue.state
        manifest = state.manifest
        key = (manifest.name, manifest.version)
        wire = wire_key(*key)
        delay = manifest.max_delay_ms / 1000
        while True:
            queue.prune()
            if not len(queue):
                queue.grew.clear()
                self._changed.set()  # a draining version may be empty now
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
            worker = await self._idle_worker(wire)
            limit = _batch_size(len(queue), manifest)
            items = queue.take(limit)
            if not items:
                self._idle.put_nowait(worker)
                continue
            batch_id = next(self._ids)
            now = time.monotonic()
            for item in items:
                item.dispatched, item.batch_size = now, len(items)
            worker.running[batch_id] = items
            self._running_keys[batch_id] = key
            state.batches += 1
            state.items += len(items)
            if self._metrics is not None:
                self._waits[batch_id] = [now - i.enqueued for i in items]
                self._batch_models[batch_id] = manifest
                self._metrics.inference_queue(manifest.name, manifest.version, len(queue))
            self._workers_changed()
            if not worker.send(("run", batch_id, wire, [i.value for i in items])):
                self._lost(worker)
            elif len(worker.running) < self.in_flight:
                self._idle.put_nowait(worker)  # it can take another while this one runs

    async def _idle_worker(self, wire: str) -> _Worker:
        while True:
            worker = await self._idle.get()
            if worker.alive and wire in worker.loaded:
                return worker
            if worker.alive:  # cannot serve this model: let another batcher have it
                self._idle.put_nowait(worker)
                await asyncio.sleep(0.001)

    # -- messages from workers -----------------------------------------------------------------

    def _received(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "loaded":
            self._loaded(worker, *message[1:])
        elif kind == "done":
            self._done(worker, *message[1:])
        elif kind == "unloaded":
            worker.loaded.discard(message[1])
        elif kind == "models":
            reply = self._replies.pop(message[1], None)
            if reply is not None and not reply.done():
                reply.set_result(message[2])
        self._changed.set()

    def _loaded(self, worker: _Worker, wire: str, error: str | None, seconds: float) -> None:
        key = next((k for k in self._states if wire_key(*k) == wire), None)
        state = self._states.get(key) if key is not None else None
        if state is None or state.status is ModelStatus.DRAINING:  # dropped meanwhile
            if error is None and worker.alive:
                worker.send(("unload", wire))
        elif key in self._adding:  # `add` decides once every worker has answered
            if error is None:
                worker.loaded.add(wire)
            elif state.error is None:
                state.error = error
        elif error is None:
            worker.loaded.add(wire)
            if state.status is not ModelStatus.READY:
                manifest = state.manifest
                log.info(
                    "model %s ready (version %s, %.2f s on worker %d)",
                    manifest.name,
                    manifest.version,
                    seconds,
                    worker.index,
                )
            state.status, state.error = ModelStatus.READY, None
            state.ready.set()
        else:
            if state.status is not ModelStatus.READY:
                log.error(
                    "model %s failed to load (version %s): %s",
                    state.manifest.name,
                    state.manifest.version,
                    error,
                )
                state.status, state.error = ModelStatus.FAILED, error
            state.ready.set()
        self._load_settled(worker, wire)

    def _load_settled(self, worker: _Worker, wire: str) -> None:
        """A worker is done with a load: it joins the rotation once its first loads are."""
        worker.pending_loads.discard(wire)
        if worker.alive and not worker.serving and not worker.pending_loads:
            worker.serving = True
            if not worker.running:
                self._idle.put_nowait(worker)

    def _done(
        self, worker: _Worker, batch_id: int, results: list[tuple[Any, ...]], run_s: float
    ) -> None:
        ran = worker.running.pop(batch_id, None)
        items = ran or []
        self._running_keys.pop(batch_id, None)
        waits = self._waits.pop(batch_id, None)
        manifest = self._batch_models.pop(batch_id, None)
        if self._metrics is not None and waits is not None and manifest is not None and items:
            self._metrics.inference_batch(manifest.name, manifest.version, len(items), waits, run_s)
        now = time.monotonic()
        for item, result in zip(items, results, strict=False):
            item.done, item.compute_s = now, run_s
            if item.future.done():
                continue  # cancelled while it ran
            if result[0] == "ok":
                item.future.set_result(result[1])
            else:
                item.future.set_exception(ERRORS.get(result[1], InferenceError)(result[2]))
        if (
            worker.alive
            and worker.serving
            and ran is not None
            and len(worker.running) == self.in_flight - 1
        ):
            self._idle.put_nowait(worker)  # it was full (else it is in the idle queue already)
        self._workers_changed()

    def _lost(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        self._changed.set()
        for reply in self._replies.values():  # its answer will not come
            if not reply.done():
                reply.set_exception(WorkerLost("an inference worker died"))
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
            if not any(w.alive for w in self._workers):
                self._none_left()
            self._workers_changed()
            return
        self._restarts += 1
        self._spawn(worker.index)
        if self._metrics is not None:
            self._metrics.inference_worker_restarted()
        self._workers_changed()

    def _none_left(self) -> None:
        """Every worker died and none may start again: the versions still loading fail, so
        that what waits for them (start-up, `wait_ready`, `warmed`) hears why at once instead
        of waiting out its timeout (a worker that dies at every load was seen to)."""
        for key, state in self._states.items():
            if not state.ready.is_set():
                state.status = ModelStatus.FAILED
                state.error = "no inference worker is left (restarts exhausted)"
                state.ready.set()
                log.error("model %s failed to load: %s", wire_key(*key), state.error)

    def _workers_changed(self) -> None:
        if self._metrics is not None:
            alive = [w for w in self._workers if w.alive]
            self._metrics.inference_workers_changed(len(alive), sum(1 for w in alive if w.running))

    def _fail_running(self, worker: _Worker, error: InferenceError) -> None:
        for batch_id in worker.running:
            self._waits.pop(batch_id, None)
            self._batch_models.pop(batch_id, None)
            self._running_keys.pop(batch_id, None)
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
