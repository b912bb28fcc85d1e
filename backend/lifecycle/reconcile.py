"""Keeps this replica's inference pool in step with the registry: the vision versions it should
hold are loaded and warmed (then reported ready), the retired ones drained and unloaded.

A `PoolReconciler` is a registry watcher listener (`listener(snapshot)`), called on every change
and every periodic reconcile. It never blocks the watcher: each load and each removal is a task
it owns, bounded by a timeout and cancelled when it closes; when one ends, it reconciles again
with the latest snapshot. A version that failed to load is tried again only once a newer
snapshot comes (the registry marks it failed meanwhile).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from backend.core.tasks import cancel_and_wait
from backend.inference.client import InferenceError, ModelStatus
from backend.inference.manifest import IN_PROCESS_RUNTIMES, ManifestError, ModelManifest
from backend.inference.pool import InferencePool
from backend.lifecycle.policy import (
    LOADED,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (model, version)
# report(replica_id, model, version, ok, error): the registry watcher's readiness report
Report = Callable[[str, str, str, bool, str | None], Awaitable[None] | None]


class PoolReconciler:
    """Loads the registry's vision versions into the pool and unloads the retired ones."""

    def __init__(
        self,
        pool: InferencePool,
        report: Report,
        *,
        replica_id: str,
        load_timeout_s: float = 300.0,
        drain_s: float = 30.0,
        report_retry_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._report = report
        self._replica_id = replica_id
        self._load_timeout_s = load_timeout_s
        self._drain_s = drain_s
        self._report_retry_s = report_retry_s
        self._snapshot = RegistrySnapshot()
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._reported: set[Key] = set()
        self._failed: dict[Key, int] = {}  # the snapshot revision its load failed under
        self._report_after: dict[Key, float] = {}  # a report that failed: not again before
        self._closed = False

    async def __call__(self, snapshot: RegistrySnapshot) -> None:
        """The watcher's listener: returns at once; the work runs in the background."""
        if snapshot.revision < self._snapshot.revision or self._closed:
            return
        self._snapshot = snapshot
        self.reconcile()

    async def close(self) -> None:
        """Stops every load and removal in progress (a half-loaded version is dropped)."""
        self._closed = True
        await cancel_and_wait(list(self._tasks.values()))

    async def settled(self) -> None:
        """Waits until no load or removal is in progress (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def reconcile(self) -> None:
        """Starts what the latest snapshot asks of this replica and is not under way."""
        if self._closed:
            return
        snapshot = self._snapshot
        here = self._pool.versions()
        for model, records in snapshot.versions.items():
            for record in records:
                in_process = record.spec.get("runtime") in IN_PROCESS_RUNTIMES  # Tesseract
                if record.kind is not ModelKind.VISION or in_process:  # each server has its own
                    continue
                key = (model, record.version)
                if key in self._tasks:
                    continue
                state = here.get(key)
                if record.status in LOADED:
                    if state is None or state.status is ModelStatus.FAILED:
                        if self._failed.get(key, -1) < snapshot.revision:
                            self._start(key, self._load(record))
                    elif (
                        state.status is ModelStatus.READY
                        and key not in self._reported
                        and self._report_after.get(key, 0.0) <= time.monotonic()
                    ):
                        self._start(key, self._ready(key))
                elif state is not None and state.status is not ModelStatus.DRAINING:
                    self._start(key, self._remove(key))
            self._follow_live(model)

    def _start(self, key: Key, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run(), name=f"reconcile-{key[0]}@{key[1]}")
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._ended(key, task))

    def _ended(self, key: Key, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("reconciling %s@%s failed", *key, exc_info=task.exception())
        self.reconcile()  # the latest snapshot may ask for more

    def _follow_live(self, model: str) -> None:
        """Callers that name no version get the policy's live version once it is ready here."""
        policy = self._snapshot.policies.get(model)
        if policy is None or not policy.arms:
            return
        state = self._pool.versions().get((model, policy.live))
        if state is not None and state.status is ModelStatus.READY:
            self._pool.set_default(model, policy.live)

    async def _load(self, record: ModelVersionRecord) -> None:
        key = (record.model, record.version)
        try:
            manifest = ModelManifest.from_dict(
                {**record.spec, "name": record.model, "version": record.version}
            )
            await self._pool.add(manifest, timeout_s=self._load_timeout_s)
        except (InferenceError, ManifestError) as exc:
            self._failed[key] = self._snapshot.revision
            log.error("model %s@%s did not load here: %s", *key, exc)
            await self._tell(key, False, str(exc))
            return
        self._failed.pop(key, None)
        await self._ready(key)

    async def _ready(self, key: Key) -> None:
        if await self._tell(key, True, None):
            self._reported.add(key)

    async def _remove(self, key: Key) -> None:
        model, version = key
        if self._pool.default_version(model) == version:
            successor = self._successor(model, version)
            if successor is not None:
                self._pool.set_default(model, successor)
        try:
            await self._pool.remove(model, version, grace_s=self._drain_s)
        except InferenceError as exc:  # the only version left that serves: kept
            log.warning("model %s@%s stays loaded: %s", model, version, exc)
            return
        self._reported.discard(key)

    def _successor(self, model: str, version: str) -> str | None:
        """The version that becomes the default when `version` retires: the live one, else
        another the registry keeps loaded that is ready here."""
        policy = self._snapshot.policies.get(model)
        keep = [
            r.version
            for r in self._snapshot.versions.get(model, ())
            if r.status in LOADED and r.version != version
        ]
        if policy is not None and policy.arms:
            keep.insert(0, policy.live)
        here = self._pool.versions()
        for candidate in keep:
            state = here.get((model, candidate))
            if candidate != version and state is not None and state.status is ModelStatus.READY:
                return candidate
        return None

    async def _tell(self, key: Key, ok: bool, error: str | None) -> bool:
        """Reports readiness to the registry; a report that fails is logged and made again
        by a reconcile `report_retry_s` later at the soonest."""
        try:
            result = self._report(self._replica_id, key[0], key[1], ok, error)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("reporting %s@%s to the registry failed", *key)
            self._report_after[key] = time.monotonic() + self._report_retry_s
            return False
        self._report_after.pop(key, None)
        return True
