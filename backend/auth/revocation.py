"""Ends sessions before their credentials expire, on every replica.

Access tokens are verified without the database, so a revocation is a record in Redis that
outlives every credential it refuses:
- a session (a refresh-token family; its access tokens carry it as `sid`): logout, reuse of a
  refresh token;
- a user's "not before" time: credentials issued (API keys: verified) before it are refused;
  set when the user is disabled, deleted or given another role;
- an API key: its cached verification is no longer trusted (the database says it is revoked).

Using a credential costs one MGET of its records. Open sockets and streams are not polled one
by one: each replica keeps a weak registry of the credentials they use, ends the matching ones
when a revocation is published (pub/sub, so at once), and re-reads the records of all of them
in one MGET per `revocation_check_interval_s`, in case a message was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from enum import StrEnum
from types import TracebackType
from typing import TypeVar

from redis.asyncio import Redis

from backend.auth.errors import InvalidToken
from backend.auth.principal import Principal
from backend.config import AuthSettings
from backend.core.redis import KeySpace, listen
from backend.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "revocations"
_MGET_CHUNK = 1000


class Record(StrEnum):
    SESSION = "session"
    USER = "user"
    KEY = "key"


REASONS = {
    Record.SESSION: "session revoked; sign in again",
    Record.USER: "the account's credentials were revoked; sign in again",
    Record.KEY: "API key revoked",
}
EXPIRED = "credential expired; reconnect with a fresh token"


def verdict(principal: Principal, session: bytes | None, user: bytes | None) -> str | None:
    """Why the records refuse `principal` (None: they do not). `session` is the record of
    its session (access tokens) or key (API keys), `user` its user's not-before time."""
    if session is not None:
        return REASONS[Record.KEY if principal.api_key_id else Record.SESSION]
    if user is not None and (principal.issued_at or 0.0) < float(user):
        return REASONS[Record.USER]
    return None


class CredentialWatch:
    """A credential in use by an open socket or stream; `end` wakes whatever waits on it."""

    __slots__ = ("__weakref__", "_waiting", "principal", "reason")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.reason: str | None = None
        self._waiting: set[asyncio.Timeout | _Relaying] = set()

    def end(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        now = asyncio.get_running_loop().time()
        for waiting in list(self._waiting):
            if isinstance(waiting, _Relaying):
                waiting.stop()
                continue
            with contextlib.suppress(RuntimeError):  # already leaving its block
                waiting.reschedule(now)

    def check(self) -> None:
        """Raises InvalidToken when the credential was revoked or has expired."""
        if self.reason is not None:
            raise InvalidToken(self.reason)
        expires_at = self.principal.expires_at
        if expires_at is not None and expires_at <= time.time():
            raise InvalidToken(EXPIRED)

    def guard(self) -> _Guard:
        """`async with watch.guard():` runs the block until the credential expires or is
        revoked: then the block is cancelled and InvalidToken (UNAUTHENTICATED) raised."""
        return _Guard(self)

    async def relay(self, stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        """Relays `stream` until the credential expires or is revoked, then raises
        InvalidToken (UNAUTHENTICATED); closes `stream` either way. What `guard` does around
        each item, with one timer for the whole stream rather than one per item (this wraps
        every token of every stream)."""
        relaying = _Relaying()
        expires_at = self.principal.expires_at
        expiry = None
        if expires_at is not None:
            expiry = asyncio.get_running_loop().call_later(
                max(0.0, expires_at - time.time()), relaying.stop, True
            )
        self._waiting.add(relaying)
        try:
            while True:
                if relaying.expired:
                    raise InvalidToken(EXPIRED)
                self.check()
                try:
                    item = await relaying.next(stream)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not relaying.withdrawn:
                        raise
                    self.check()  # revoked: its reason
                    raise InvalidToken(EXPIRED) from None
                yield item  # after a stop the stream swallowed, the checks above end it
        finally:
            if expiry is not None:
                expiry.cancel()
            self._waiting.discard(relaying)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


class _Relaying:
    """A relayed stream's wait for its next item, which `stop` (a revocation, or the expiry
    with `expired`) cancels, as a deadline moved to now cancels a `guard`'s block. Between
    items nothing is cancelled: the relay checks the credential before it waits again."""

    __slots__ = ("_stopping", "_task", "expired", "withdrawn")

    def __init__(self) -> None:
        self._task: asyncio.Task[object] | None = None  # while waiting for an item
        self._stopping = False
        self.expired = False
        # The last wait was cancelled by `stop` alone, and that cancellation withdrawn (as
        # asyncio.timeout withdraws its own); not when the task's owner cancelled it too.
        self.withdrawn = False

    async def next(self, stream: AsyncIterator[T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._task, self.withdrawn = task, False
        try:
            return await anext(stream)
        finally:
            self._task = None
            if self._stopping:  # whatever the wait ended with (the stream may swallow it)
                self._stopping = False
                self.withdrawn = task.uncancel() <= cancelling

    def stop(self, expired: bool = False) -> None:
        self.expired = self.expired or expired
        if self._task is not None and not self._stopping:
            self._stopping = True
            self._task.cancel()


class _Guard:
    """A deadline (the credential's expiry) that a revocation moves to now. A class, not a
    generator: it wraps every event of every stream."""

    __slots__ = ("_timeout", "_watch")

    def __init__(self, watch: CredentialWatch) -> None:
        self._watch = watch
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        watch = self._watch
        watch.check()
        expires_at = watch.principal.expires_at
        timeout = asyncio.timeout(None if expires_at is None else expires_at - time.time())
        await timeout.__aenter__()
        self._timeout = timeout
        watch._waiting.add(timeout)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        timeout = self._timeout
        assert timeout is not None
        self._watch._waiting.discard(timeout)
        try:
            return await timeout.__aexit__(kind, error, tb)
        except TimeoutError:
            if not timeout.expired():  # the block's own error, not our deadline
                raise
            self._watch.check()
            raise InvalidToken(EXPIRED) from None


def _record_keys(principal: Principal) -> tuple[tuple[Record, uuid.UUID] | None, uuid.UUID]:
    if principal.api_key_id is not None:
        return (Record.KEY, principal.api_key_id), principal.user_id
    if principal.session_id is not None:
        return (Record.SESSION, principal.session_id), principal.user_id
    return None, principal.user_id


class Revocations:
    """Writes, checks and delivers revocations (see the module docstring)."""

    def __init__(
        self, redis: Redis, keys: KeySpace, settings: AuthSettings, token_ttl_s: int
    ) -> None:
        self._redis = redis
        self._keys = keys.child("revoked")
        self._channel = keys(CHANNEL)
        self._interval_s = settings.revocation_check_interval_s
        # Long enough for every credential a record refuses: access tokens until they expire,
        # cached API key verifications until they are dropped, open streams until re-read.
        self._ttl_s = int(
            max(
                token_ttl_s + settings.clock_skew_s,
                2 * settings.api_key_cache_ttl_s,
                2 * settings.revocation_check_interval_s,
            )
            + 60
        )
        self._watches: dict[str, weakref.WeakSet[CredentialWatch]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def _key(self, record: Record, ident: uuid.UUID) -> str:
        return self._keys(record.value, str(ident))

    # -- writing -----------------------------------------------------------------------------

    async def revoke(self, record: Record, ident: uuid.UUID) -> None:
        """Writes the record, ends the matching watches here, and tells the other replicas."""
        at = time.time()
        message = json.dumps({"record": record.value, "id": str(ident), "at": at})
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key(record, ident), repr(at), ex=self._ttl_s)
            pipe.publish(self._channel, message)
            await pipe.execute()
        self._deliver(record, ident, at)

    # -- checking ------------------------------------------------------------------------------

    async def check(self, principal: Principal) -> str | None:
        """Why `principal` is refused (None: it is not): one MGET."""
        own, user_id = _record_keys(principal)
        keys = [self._key(Record.USER, user_id)]
        if own is not None:
            keys.append(self._key(*own))
        values = await self._redis.mget(keys)
        return verdict(principal, values[1] if own is not None else None, values[0])

    # -- open sockets and streams --------------------------------------------------------------

    def watch(self, principal: Principal) -> CredentialWatch:
        """A watch on `principal`, held weakly: it is forgotten with its socket or stream."""
        watch = CredentialWatch(principal)
        own, user_id = _record_keys(principal)
        names = [f"{Record.USER.value}:{user_id}"]
        if own is not None:
            names.append(f"{own[0].value}:{own[1]}")
        for name in names:
            self._watches.setdefault(name, weakref.WeakSet()).add(watch)
        return watch

    def _deliver(self, record: Record, ident: uuid.UUID, at: float) -> None:
        watches = self._watches.get(f"{record.value}:{ident}")
        if not watches:
            return
        for watch in list(watches):
            if record is not Record.USER or (watch.principal.issued_at or 0.0) < at:
                watch.end(REASONS[record])

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="revocations-listener"),
            asyncio.create_task(self._sweep(), name="revocations-sweeper"),
        ]

    async def close(self) -> None:
        self._closed = True  # see `listen`: a cancellation alone may be lost
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks, "shutdown")

    async def _listen(self) -> None:
        await listen(
            self._redis,
            self._channel,
            self._published,
            stopped=lambda: self._closed,
            name="revocations listener",
        )

    def _published(self, data: bytes) -> None:
        try:
            body = json.loads(data)
            self._deliver(Record(body["record"]), uuid.UUID(body["id"]), float(body["at"]))
        except (ValueError, KeyError, TypeError):
            log.warning("revocations: ignored a malformed message")

    async def _sweep(self) -> None:
        """Re-reads the records of every watched credential, in case a message was missed."""
        while not self._closed:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a Redis hiccup must not end the sweep
                log.warning("revocations sweep: %s", exc)

    async def sweep_once(self) -> None:
        for name in [name for name, watches in self._watches.items() if not watches]:
            del self._watches[name]
        live: dict[int, CredentialWatch] = {}
        for watches in self._watches.values():
            for watch in watches:
                if watch.reason is None:
                    live[id(watch)] = watch
        await self._check_all(list(live.values()))

    async def _check_all(self, watches: Sequence[CredentialWatch]) -> None:
        for start in range(0, len(watches), _MGET_CHUNK):
            chunk = watches[start : start + _MGET_CHUNK]
            keys: list[str] = []
            for watch in chunk:
                own, user_id = _record_keys(watch.principal)
                keys.append(self._key(Record.USER, user_id))
                keys.append(self._key(*own) if own is not None else self._key(Record.USER, user_id))
            values = await self._redis.mget(keys)
            for i, watch in enumerate(chunk):
                own_value = values[2 * i + 1] if _record_keys(watch.principal)[0] else None
                reason = verdict(watch.principal, own_value, values[2 * i])
                if reason is not None:
                    watch.end(reason)
