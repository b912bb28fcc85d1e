"""Sharing work between ingestion jobs: a budget of chunks in flight, and a micro-batcher that
stores many small documents in one transaction.

A folder of small files is the common case, and each file alone is cheap to embed and store:
what costs is the per-document overhead (a transaction, its round trips, a forward pass for one
or two texts). Jobs therefore run side by side up to a budget counted in chunks, not documents,
so that many small documents fill the embedder's batches, and hand their embedded chunks to a
batcher that writes whatever is ready within a few milliseconds in one unit of work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from backend.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class ChunkBudget:
    """A semaphore counted in chunks, first come first served (a large document waiting is not
    overtaken forever by small ones). A request larger than the budget takes all of it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, chunks: int) -> AsyncIterator[None]:
        units = max(1, min(chunks, self.size))
        await self._acquire(units)
        try:
            yield
        finally:
            self._free += units
            self._wake()

    async def _acquire(self, units: int) -> None:
        if not self._waiters and self._free >= units:
            self._free -= units
            return
        future = asyncio.get_running_loop().create_future()
        entry = (units, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():  # granted as it was cancelled
                self._free += units
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            self._wake()
            raise

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._free:
            units, future = self._waiters.popleft()
            if future.done():
                continue
            self._free -= units
            future.set_result(None)


@dataclass
class _Waiting(Generic[Item, Result]):
    item: Item
    weight: int
    future: asyncio.Future[Result] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class MicroBatcher(Generic[Item, Result]):
    """Items submitted with the same key within `delay_s` of the first (up to `max_weight` in
    all) are handed to `flush` together; `flush` returns one result, or exception, per item.

    The batcher owns its task: it starts with the first item and stops on `aclose`, failing
    whatever still waits. A submitter cancelled while its item waits takes the item out of the
    batch; one cancelled while its batch is being written does not stop the others' write.
    Batches of different keys are written concurrently (up to `max_concurrent`)."""

    def __init__(
        self,
        flush: Callable[[Hashable, list[Item]], Awaitable[Sequence[Result | BaseException]]],
        *,
        delay_s: float,
        max_weight: int,
        max_concurrent: int = 2,
        name: str = "micro-batcher",
    ) -> None:
        self._flush = flush
        self._delay_s = delay_s
        self._max_weight = max_weight
        self._name = name
        self._pending: dict[Hashable, list[_Waiting[Item, Result]]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._writers: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._closed = False

    async def submit(self, key: Hashable, item: Item, weight: int = 1) -> Result:
        if self._closed:
            raise RuntimeError(f"{self._name} is closed")
        waiting: _Waiting[Item, Result] = _Waiting(item, weight)
        batch = self._pending.setdefault(key, [])
        batch.append(waiting)
        if sum(w.weight for w in batch) >= self._max_weight:
            self._dispatch(key)
        elif key not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self._delay_s, self._dispatch, key)
        try:
            return await asyncio.shield(waiting.future)
        except asyncio.CancelledError:
            # still waiting: leave the batch (a batch being written goes on without us)
            queued = self._pending.get(key, [])
            if waiting in queued:
                queued.remove(waiting)
                waiting.future.cancel()
            else:  # its batch is being written: its outcome is nobody's to read now
                waiting.future.add_done_callback(_retrieved)
            raise

    def _dispatch(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        batch = self._pending.pop(key, [])
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._write(key, batch), name=self._name)
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)

    async def _write(self, key: Hashable, batch: list[_Waiting[Item, Result]]) -> None:
        try:
            async with self._slots:
                live = [w for w in batch if not w.future.done()]
                if not live:
                    return
                results = await self._flush(key, [w.item for w in live])
        except BaseException as exc:  # every waiter hears of it: never one left hanging
            failure = exc if isinstance(exc, Exception) else RuntimeError(f"{self._name} stopped")
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for w, result in zip(live, results, strict=True):
            if w.future.done():
                continue
            if isinstance(result, BaseException):
                w.future.set_exception(result)
            else:
                w.future.set_result(result)

    async def aclose(self) -> None:
        """Writes nothing more: batches being written are cancelled (their transactions roll
        back) and every waiter is failed."""
        self._closed = True
        for key in list(self._timers):
            self._timers.pop(key).cancel()
        for batch in self._pending.values():
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(RuntimeError(f"{self._name} closed"))
        self._pending.clear()
        await cancel_and_wait(list(self._writers))


def _retrieved(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
