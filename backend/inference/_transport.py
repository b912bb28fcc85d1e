"""How messages, and a batch's inputs above all, travel from the serving process to a worker.

Every message to a worker leaves through that worker's sender thread, in order, so that no pipe
write (megabytes for a batch of images) ever blocks the event loop.

A batch whose inputs are numpy arrays of one dtype and shape travels through a shared-memory
slab (one per worker, owned by the serving process, with a segment for each batch the worker
may hold at once): the sender thread stacks the arrays straight into a free segment and the
pipe carries only a small header (`SlabBatch`); the worker maps each segment once and hands
its runtime the batch as views of it (`StackedBatch`, whose `array` the runtimes give to torch
or onnxruntime without another copy). Anything else (dicts, images of different shapes, a
batch over a segment's capacity, a batch sent while every segment holds
an unanswered one) is pickled through the pipe as before.

A segment is free again when its batch's reply arrives. The names are unlinked when the worker is
lost or the pool closes; a serving process killed outright leaves it to multiprocessing's
resource tracker, which unlinks what its processes registered.

Needs only the standard library and numpy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

SLAB_PREFIX = "sightline_"  # then the serving process's pid: a test finds a pool's slabs by it


def slab_prefix(pid: int | None = None) -> str:
    """The start of the names of the slabs that process `pid` (this one by default) creates."""
    return f"{SLAB_PREFIX}{os.getpid() if pid is None else pid}_"


class SlabBatch(NamedTuple):
    """What the pipe carries of a batch in the slab: where it is and how to read it."""

    slab: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # the stacked batch's: (items, *item shape)


class StackedBatch(list[Any]):
    """A batch of arrays (as the list of its items) that are views of one stacked array."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array)
        self.array = array


def stacked(batch: list[Any]) -> np.ndarray:
    """The batch as one array: the slab's view itself where the batch came through the slab."""
    array = getattr(batch, "array", None)
    if isinstance(array, np.ndarray) and len(array) == len(batch):
        return array
    return np.stack(batch)


# -- the serving process ---------------------------------------------------------------------


class Slab:
    """A worker's shared-memory slab, on the serving process's side: one segment per batch the
    worker may hold at once (`count`), each of `capacity` bytes."""

    def __init__(self, capacity: int, count: int = 1) -> None:
        self.capacity = capacity
        self.segments: list[shared_memory.SharedMemory] = []
        for _ in range(count if capacity > 0 else 0):
            segment = _reserve(capacity)
            if segment is None:
                break
            self.segments.append(segment)
        self.holding: list[int | None] = [None] * len(self.segments)  # batch ids, until replies
        self._unlinked = False

    @property
    def names(self) -> list[str]:
        return [segment.name for segment in self.segments]

    def pack(self, batch_id: int, inputs: Sequence[Any]) -> Any:
        """A header for the inputs, stacked into a free segment, where they fit; else the
        inputs themselves (for the pipe). Called by the sender thread only."""
        if self._unlinked or None not in self.holding or not inputs:
            return inputs
        first = inputs[0]
        if not isinstance(first, np.ndarray) or first.dtype.hasobject:
            return inputs
        if any(
            not isinstance(x, np.ndarray) or x.dtype != first.dtype or x.shape != first.shape
            for x in inputs
        ):
            return inputs
        if first.nbytes * len(inputs) > self.capacity:
            return inputs
        index = self.holding.index(None)
        self.holding[index] = batch_id
        segment = self.segments[index]
        shape = (len(inputs), *first.shape)
        view = np.ndarray(shape, dtype=first.dtype, buffer=segment.buf)
        np.stack(inputs, out=view)
        del view  # no export of the buffer outlives the call: `close` would refuse
        return SlabBatch(segment.name, first.dtype, shape)

    def release(self, batch_id: int) -> None:
        """The worker answered batch `batch_id`: its segment may take another."""
        for index, holding in enumerate(self.holding):
            if holding == batch_id:
                self.holding[index] = None

    def unlink(self) -> None:
        """Removes the segments' names (the memory goes with the last mapping)."""
        if not self._unlinked:
            self._unlinked = True
            for segment in self.segments:
                with contextlib.suppress(FileNotFoundError):
                    segment.unlink()

    def close(self) -> None:
        for segment in self.segments:
            with contextlib.suppress(BufferError):
                segment.close()


def _reserve(capacity: int) -> shared_memory.SharedMemory | None:
    """A segment whose memory is reserved now: a full /dev/shm (64 MB in a container by default)
    then refuses it here, instead of killing the serving process (SIGBUS) at its first write."""
    name = f"{slab_prefix()}{secrets.token_hex(4)}"
    segment = shared_memory.SharedMemory(name=name, create=True, size=capacity)
    fd = getattr(segment, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return segment
    try:
        os.posix_fallocate(fd, 0, capacity)
        return segment
    except OSError as exc:
        log.warning(
            "no room for a %d-byte batch slab in shared memory (%s): batches take the pipe",
            capacity,
            exc,
        )
        segment.unlink()
        segment.close()
        return None


class Sender:
    """A worker's sender thread: writes its messages to the pipe in order, off the event loop.

    `on_broken` is called (from the thread) once when a write fails: the worker is gone. After
    `retire` the thread writes what it was given before, then closes the pipe and the slab."""

    _RETIRE = object()

    def __init__(
        self, conn: Connection, slab: Slab, name: str, on_broken: Callable[[], None]
    ) -> None:
        self.conn = conn
        self.slab = slab
        self._on_broken = on_broken
        self._messages: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._retired = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, message: tuple[Any, ...]) -> bool:
        """Queues a message; a `run` message's last field is its inputs. False once retired."""
        if self._retired:
            return False
        self._messages.put(message)
        return True

    def retire(self) -> None:
        """Unlinks the slab now; the thread ends after the messages queued before."""
        if not self._retired:
            self._retired = True
            self.slab.unlink()
            self._messages.put(self._RETIRE)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        broken = False
        try:
            while True:
                message = self._messages.get()
                if message is self._RETIRE:
                    return
                if broken:
                    continue
                try:
                    if message[0] == "run":
                        message = (*message[:-1], self.slab.pack(message[1], message[-1]))
                    self.conn.send(message)
                except (OSError, ValueError) as exc:  # ValueError: closed, or unpicklable
                    if isinstance(exc, ValueError) and not self.conn.closed:
                        log.exception("a message to an inference worker could not be sent")
                    broken = True
                    self._on_broken()
        finally:
            self.slab.unlink()
            self.slab.close()
            with contextlib.suppress(OSError):
                self.conn.close()


# -- the worker process ------------------------------------------------------------------------


class SlabReader:
    """The worker's side: maps each segment of its slab once (page-locked for the GPU where
    torch has one) and reads batches from them as views."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._segments: dict[str, shared_memory.SharedMemory] = {}

    def unpack(self, inputs: Any) -> list[Any]:
        if not isinstance(inputs, SlabBatch):
            return list(inputs)
        segment = self._segments.get(inputs.slab)
        if segment is None:
            segment = self._segments[inputs.slab] = _attach(inputs.slab)
            _pin(segment, self.device)
        array = np.ndarray(inputs.shape, dtype=inputs.dtype, buffer=segment.buf)
        return StackedBatch(array)


def _attach(name: str) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):  # the serving process owns it: never the worker's to unlink
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
    return shared_memory.SharedMemory(name=name)


def _pin(memory: shared_memory.SharedMemory, device: str) -> None:
    """Page-locks the slab for the GPU (copies to it then go at full speed, without staging)."""
    torch = sys.modules.get("torch")  # only where a torch runtime is loaded
    if torch is None or not device.startswith(("cuda", "auto")):
        return
    try:
        if not torch.cuda.is_available():
            return
        address = np.frombuffer(memory.buf, dtype=np.uint8).ctypes.data
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(address, memory.size, 0)
        success = getattr(getattr(cudart, "cudaError", None), "success", 0)
        if error != success:  # an error code, not an exception
            log.warning("the batch slab is not page-locked: %s", error)
    except Exception as exc:  # pinning is a speed-up only
        log.warning("the batch slab is not page-locked: %s", exc)
