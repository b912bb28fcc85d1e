"""Keeps one replica's view of the model registry current, and tells the parts that route and
load models.

The app's lifespan owns one `RegistryWatcher` per replica. It reads the registry from
PostgreSQL at start, again on every change the registry service publishes over Redis (a newer
revision than it holds), and every `reconcile_s` in any case, so a replica that missed a
message, or lost its subscription for a while, converges all the same. Each new state goes to
the registered listeners (`await listener(snapshot)`: routing, the inference pool's
reconciler), one after the other, each within `listener_timeout_s`; a listener that fails is
logged and the others still get the state.

The watcher also keeps the replica's heartbeat in Redis and reports the versions the replica
loaded (`report`): a LOADING version becomes READY when every live replica has loaded it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from backend.config import LifecycleSettings
from backend.core.redis import listen
from backend.core.tasks import cancel_and_wait
from backend.lifecycle.policy import RegistrySnapshot, TrafficPolicy, VersionStatus
from backend.lifecycle.service import ModelRegistryService

log = logging.getLogger(__name__)

Listener = Callable[[RegistrySnapshot], Awaitable[None]]
_LEAVE_TIMEOUT_S = 2.0


def replica_name() -> str:
    """This process's name among replicas: host, pid and a random tail (a restarted process
    is a new replica)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RegistryWatcher:
    def __init__(
        self,
        service: ModelRegistryService,
        redis: Redis,
        settings: LifecycleSettings,
        *,
        replica_id: str | None = None,
    ) -> None:
        self._service = service
        self._redis = redis
        self._settings = settings
        self.replica_id = replica_id or replica_name()
        self._snapshot = RegistrySnapshot()
        self._delivered: RegistrySnapshot | None = None
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self._announced = 0  # the newest revision announced over Redis
        self._changed = asyncio.Condition()
        self._refreshing = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def snapshot(self) -> RegistrySnapshot:
        """The registry as this replica last read it."""
        return self._snapshot

    def policies(self) -> list[TrafficPolicy]:
        """Every traffic policy in force (for the canary guard)."""
        return list(self._snapshot.policies.values())

    def policy(self, model: str) -> TrafficPolicy | None:
        """A model's traffic policy in force, if it has one (for `modelComparison`)."""
        return self._snapshot.policies.get(model)

    def add_listener(self, listener: Listener) -> None:
        """`listener` gets every new state (and, when added before `start`, the first)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def start(self) -> None:
        """Reads the registry (failing if it cannot), then listens, reconciles and beats."""
        await self.refresh()
        try:
            async with asyncio.timeout(self._settings.reload_timeout_s):
                await self._beat_once()
        except Exception as exc:  # the beat loop tries again
            log.warning("model registry: heartbeat failed: %s", exc)
        self._tasks = [
            asyncio.create_task(self._listen(), name="model-registry-listener"),
            asyncio.create_task(self._reconcile(), name="model-registry-reconciler"),
            asyncio.create_task(self._beat(), name="model-registry-heartbeat"),
        ]

    async def close(self) -> None:
        self._closed = True  # see `backend.core.redis.listen`: a cancellation alone may be lost
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks, "shutdown")
        try:
            async with asyncio.timeout(_LEAVE_TIMEOUT_S):
                await self._service.replicas.leave(self.replica_id)
        except Exception as exc:  # its heartbeat expires anyway
            log.debug("model registry: leaving failed: %s", exc)

    async def refresh(self, *, only_behind: bool = False) -> RegistrySnapshot:
        """Reads the registry now and hands a changed state to the listeners. `only_behind`:
        unless this replica already holds the newest revision announced (a refresh after its
        own change read it)."""
        async with self._refreshing:
            if only_behind and self._announced <= self._snapshot.revision:
                return self._snapshot
            async with asyncio.timeout(self._settings.reload_timeout_s):
                snapshot = await self._service.snapshot()
            if snapshot.revision < self._snapshot.revision:
                return self._snapshot  # read before a change this replica already has
            self._snapshot = snapshot
            if snapshot != self._delivered:
                await self._deliver(snapshot)
                self._delivered = snapshot
            async with self._changed:
                self._changed.notify_all()
        return self._snapshot

    async def wait_for(self, revision: int, timeout_s: float) -> bool:
        """Waits until this replica holds `revision` (or newer) and its listeners have it;
        False when `timeout_s` passed first."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._delivered_revision() >= revision)
        except TimeoutError:
            return False
        return True

    def _delivered_revision(self) -> int:
        return self._delivered.revision if self._delivered is not None else -1

    async def report(self, model: str, version: str, ok: bool, error: str | None = None) -> None:
        """This replica loaded and warmed `model@version` (ok), or could not (error)."""
        async with asyncio.timeout(self._settings.reload_timeout_s):
            await self._service.report_readiness(self.replica_id, model, version, ok, error)

    async def _deliver(self, snapshot: RegistrySnapshot) -> None:
        for listener in list(self._listeners):
            try:
                async with asyncio.timeout(self._settings.listener_timeout_s):
                    await listener(snapshot)
            except asyncio.CancelledError:
                raise
            except Exception:  # one listener's failure must not keep the state from others
                log.exception(
                    "model registry: listener %s failed on revision %d",
                    getattr(listener, "__qualname__", listener),
                    snapshot.revision,
                )

    async def _listen(self) -> None:
        await listen(
            self._redis,
            self._service.channel,
            self._published,
            stopped=lambda: self._closed,
            name="model registry listener",
        )

    def _published(self, data: bytes) -> None:
        try:
            revision = int(json.loads(data)["revision"])
        except (ValueError, KeyError, TypeError):
            log.warning("model registry: ignored a malformed message")
            return
        if revision > self._snapshot.revision:
            self._announced = max(self._announced, revision)
            self._wake.set()

    async def _reconcile(self) -> None:
        while not self._closed:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.reconcile_s):
                    woken = await self._wake.wait()
            self._wake.clear()
            try:
                await self.refresh(only_behind=woken)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away: the next round tries again
                log.warning("model registry: reload failed: %s", exc)
                await asyncio.sleep(min(1.0, self._settings.reconcile_s))

    async def _beat(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._settings.heartbeat_s)
            try:
                async with asyncio.timeout(self._settings.reload_timeout_s):
                    await self._beat_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the next beat tries again
                log.warning("model registry: heartbeat failed: %s", exc)

    async def _beat_once(self) -> None:
        """Says this replica is alive, and settles loading versions whose replicas have all
        reported (or one of which died: it no longer counts)."""
        await self._service.replicas.heartbeat(self.replica_id)
        for records in self._snapshot.versions.values():
            for record in records:
                if record.status is VersionStatus.LOADING:
                    await self._service.settle(record.model, record.version)
