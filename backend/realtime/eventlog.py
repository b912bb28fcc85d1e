"""A run's events in a Redis Stream: append with a durable cursor, replay after a cursor, tail live.

Every event gets the stream entry id as its position. A client that reconnects, to any replica,
reads from its last cursor: XRANGE replays what it missed, then XREAD blocks for what comes
next, starting exactly after the last entry delivered, so nothing is skipped or repeated.
When a consumer falls behind, consecutive token deltas waiting for it are merged into one
event (text joined, the last cursor kept): slow clients get fewer, larger deltas, never gaps.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from backend.core.redis import HeldConnection, KeySpace
from backend.core.retry import is_transient, retrying
from backend.core.tasks import cancel_and_wait
from backend.errors import AppError, ValidationFailed

log = logging.getLogger(__name__)

TOKEN_DELTA = "TokenDelta"  # noqa: S105 (an event type)
TERMINAL_TYPES = frozenset(
    {
        "RunCompleted",
        "RunFailed",
        "RunCancelled",
        "IngestionCompleted",
        "IngestionFailed",
        "VisionJobCompleted",
        "VisionJobFailed",
    }
)
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
REPLAY_BATCH = 500  # log entries a replay reads at a time
_WAKE_TTL_S = 3600  # a replica's wake-up stream outlives it by at most this


class EventsExpired(AppError):
    """The run's log is gone (finished longer ago than its TTL): read the stored message."""

    code = "RUN_EVENTS_EXPIRED"
    status = 410


@dataclass(frozen=True, slots=True)
class RunEvent:
    run_id: str
    entry_id: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def cursor(self) -> str:
        return encode_cursor(self.run_id, self.entry_id)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def encode_cursor(run_id: str, entry_id: str) -> str:
    return base64.urlsafe_b64encode(f"{run_id}|{entry_id}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str, run_id: str) -> str:
    """The stream entry id a cursor names; refuses malformed cursors and other runs' cursors."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        owner, entry_id = raw.rsplit("|", 1)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValidationFailed("malformed cursor", field="after") from None
    if owner != run_id:
        raise ValidationFailed("cursor belongs to another run", field="after")
    if not _ENTRY_ID.match(entry_id):
        raise ValidationFailed("malformed cursor", field="after")
    return entry_id


def _position(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _Subscriber:
    """One reader's queue of entries, filled by the live tail or, while the stream's producer
    runs in this process, by its appends (`local`). An empty batch only wakes the reader."""

    __slots__ = ("key", "last", "local", "queue")

    def __init__(self, key: str, last: str, *, local: bool = False) -> None:
        self.key = key
        self.last = last
        self.local = local
        self.queue: asyncio.Queue[list[Any]] = asyncio.Queue()

    def offer(self, entry_id: str, fields: dict[str, str]) -> None:
        if _position(entry_id) > _position(self.last):
            self.last = entry_id
            self.queue.put_nowait([(entry_id, fields)])


class LiveTail:
    """One blocking XREAD per replica for every run someone here is watching live.

    A connection blocked in XREAD serves one caller, so a blocking read per subscriber would
    need as many Redis connections as open streams. Here one task waits on all watched streams
    at once (each from the oldest position any of its subscribers needs) and hands entries to
    the subscribers' queues; a subscriber skips entries it already has. A subscriber that needs
    entries the XREAD in progress would not return (a new stream, or a position before the one
    read from: a client resuming while an earlier subscriber to the same stream, already ahead,
    is still registered) restarts the wait at once: registering writes to this replica's
    wake-up stream, which the XREAD includes.
    """

    def __init__(self, redis: Redis, keys: KeySpace, block_ms: int = 2_000) -> None:
        self._redis = redis
        self._wake = keys("tail-wake", uuid.uuid4().hex)
        self._block_ms = block_ms
        self._subscribers: dict[str, set[_Subscriber]] = {}
        self._reading: dict[str, str] = {}  # the positions the XREAD in progress reads after
        self._task: asyncio.Task[None] | None = None
        self._waiting = asyncio.Event()
        self._closing = False
        self._wake_expires_renew = 0.0  # when the wake-up stream's expiry is next set again

    async def register(self, subscriber: _Subscriber) -> None:
        key, last = subscriber.key, subscriber.last
        reading = self._reading.get(key)
        behind = reading is None or _position(last) < _position(reading)
        self._subscribers.setdefault(key, set()).add(subscriber)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="run-events-tail")
        self._waiting.set()
        if behind:  # wakes the XREAD in progress so it reads this stream from `last` too
            await self._redis.xadd(self._wake, {"k": key}, maxlen=16, approximate=True)
            # its expiry (a dead replica's goes) is renewed every half hour, not per subscriber
            now = time.monotonic()
            if now >= self._wake_expires_renew:
                await self._redis.expire(self._wake, _WAKE_TTL_S)
                self._wake_expires_renew = now + _WAKE_TTL_S / 2

    def unregister(self, subscriber: _Subscriber) -> None:
        watchers = self._subscribers.get(subscriber.key)
        if watchers is not None:
            watchers.discard(subscriber)
            if not watchers:
                del self._subscribers[subscriber.key]

    async def close(self) -> None:
        """Stops the tail without cancelling it inside XREAD: a command cancelled mid-reply can
        leave its pooled connection unusable for the next user. The wake-up stream makes a
        blocked XREAD return at once; cancelling is the fallback."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            self._waiting.set()
            with contextlib.suppress(Exception):
                await self._redis.xadd(self._wake, {"k": ""}, maxlen=16, approximate=True)
            try:
                await asyncio.wait_for(asyncio.shield(task), self._block_ms / 1000 + 1)
            except TimeoutError:
                await cancel_and_wait([task])
        with contextlib.suppress(Exception):
            await self._redis.delete(self._wake)

    async def _run(self) -> None:
        wake_last = "0-0"
        while not self._closing:
            if not self._subscribers:
                self._waiting.clear()
                await self._waiting.wait()
                continue
            streams = {
                key: min((s.last for s in watchers), key=_position)
                for key, watchers in self._subscribers.items()
            }
            streams[self._wake] = wake_last
            self._reading = streams
            try:
                response = await self._redis.xread(streams, block=self._block_ms, count=500)
            except (RedisError, ConnectionError, OSError, TimeoutError) as exc:
                # redis-py's ConnectionError is not the builtin one: without RedisError here a
                # dropped connection ended this task, and every live reader waited forever.
                log.warning("live tail: %s; retrying", exc)
                await asyncio.sleep(0.2)
                continue
            for raw_key, entries in response or ():
                key = _text(raw_key)
                if key == self._wake:
                    wake_last = _text(entries[-1][0])
                    continue
                for subscriber in list(self._subscribers.get(key, ())):
                    fresh = [
                        e for e in entries if _position(_text(e[0])) > _position(subscriber.last)
                    ]
                    if fresh:
                        subscriber.last = _text(fresh[-1][0])
                        subscriber.queue.put_nowait(fresh)


class _Appender:
    """Sends the XADDs that arrive while one is on the wire as one pipeline.

    Each XADD alone is a round trip and a pass through the client's command machinery; with
    hundreds of streams appending tokens, the appends that queue up while a batch is in flight
    go out together next (a group commit), so the cost per append falls as load rises and a
    lone append still leaves at once. Every caller awaits its own entry id, so a stream's
    entries keep the order their appends were made in.
    """

    MAX_BATCH = 512

    def __init__(self, redis: Redis, maxlen: int) -> None:
        self._line = HeldConnection(redis)  # one batch at a time: this task's own connection
        self._maxlen = maxlen
        self._pending: list[tuple[str, dict[str, str], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def xadd(self, key: str, fields: dict[str, str]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((key, fields, future))
        if self._task is None:
            self._task = asyncio.create_task(self._send(), name="event-log-appender")
        return await future

    async def _send(self) -> None:
        batch: list[tuple[str, dict[str, str], asyncio.Future[Any]]] = []
        try:
            while self._pending:
                batch = self._pending[: self.MAX_BATCH]
                del self._pending[: self.MAX_BATCH]
                commands = [
                    ("XADD", key, "MAXLEN", "~", self._maxlen, "*", *_flat(fields))
                    for key, fields, _ in batch
                ]
                try:
                    replies: list[Any] = await self._line.execute(commands)
                except Exception as exc:  # the connection failed: every append in it did
                    replies = [exc] * len(batch)
                for (_, _, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its caller was cancelled meanwhile
                        continue
                    if isinstance(reply, BaseException):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self._task = None
            for _, _, future in batch + self._pending:  # left only when this task was cancelled
                if not future.done():
                    future.set_exception(RedisError("event log closed"))
            self._pending.clear()

    async def close(self, timeout_s: float) -> None:
        task = self._task
        try:
            if task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout_s)
                except TimeoutError:
                    await cancel_and_wait([task])
        finally:
            await self._line.close()


class RunEventLog:
    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        *,
        max_events: int = 20_000,
        ttl_after_end_s: int = 3600,
        block_ms: int = 2_000,  # below the Redis socket timeout, or every wait would time out
        on_lag: Callable[[float], None] | None = None,
    ) -> None:
        self._on_lag = on_lag
        self._redis = redis
        self._keys = keys.child("run")
        self.max_events = max_events
        self.ttl_after_end_s = ttl_after_end_s
        self._block_ms = block_ms
        self._tail = LiveTail(redis, self._keys, block_ms)
        self._appender = _Appender(redis, max_events)
        # Streams whose producer (a run) executes in this process, and their readers here:
        # those get each entry from its append, without the live tail's XREAD round trip.
        self._producing: set[str] = set()
        self._local: dict[str, set[_Subscriber]] = {}

    async def close(self) -> None:
        await self._appender.close(self._block_ms / 1000 + 1)
        await self._tail.close()

    def _key(self, run_id: str) -> str:
        return self._keys(f"{{{run_id}}}", "events")  # hash tag: one slot per run

    def producing(self, run_id: str) -> None:
        """The run's events are appended in this process from now on (it executes here):
        readers here take them as they are appended. Every entry is still in Redis."""
        self._producing.add(self._key(run_id))

    def produced(self, run_id: str) -> None:
        """The run no longer executes here. A reader here that has not had its last event
        (its end could not be recorded here) reads the rest from Redis (`_follow`)."""
        key = self._key(run_id)
        self._producing.discard(key)
        for subscriber in self._local.get(key, ()):
            subscriber.queue.put_nowait([])  # wakes it to move over to the live tail

    def _offer(self, key: str, entry_id: str, fields: dict[str, str]) -> None:
        for subscriber in self._local.get(key, ()):
            subscriber.offer(entry_id, fields)

    async def append(self, run_id: str, type_: str, data: dict[str, Any] | None = None) -> RunEvent:
        """Adds an event; a terminal event starts the log's expiry."""
        key = self._key(run_id)
        fields = {"t": type_, "d": json.dumps(data or {}, separators=(",", ":"))}
        if type_ in TERMINAL_TYPES:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(key, fields, maxlen=self.max_events, approximate=True)
                pipe.expire(key, self.ttl_after_end_s)
                result = await pipe.execute()
            entry_id = _text(result[0])
        else:  # the hot path (every token): batched with other streams' appends, no MULTI
            entry_id = _text(await self._appender.xadd(key, fields))
        self._offer(key, entry_id, fields)
        return RunEvent(run_id, entry_id, type_, data or {})

    async def append_retrying(
        self, run_id: str, type_: str, data: dict[str, Any] | None = None, *, within_s: float
    ) -> RunEvent:
        """`append`, retried through a Redis outage of up to `within_s`. Before a retry the
        stream's last entry is read: an append whose reply was lost is not made twice."""
        body = data or {}
        attempts = 0

        async def step() -> RunEvent:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                last = await self.last(run_id)
                if last is not None and last.type == type_ and last.data == body:
                    fields = {"t": type_, "d": json.dumps(body, separators=(",", ":"))}
                    self._offer(self._key(run_id), last.entry_id, fields)
                    return last
            return await self.append(run_id, type_, body)

        return await retrying(step, within_s=within_s, what=f"{type_} event of {run_id}")

    async def append_optional(
        self, run_id: str, type_: str, data: dict[str, Any] | None = None, *, within_s: float
    ) -> None:
        """`append_retrying` for an event a stream can do without (progress): one that cannot
        be written through an outage of `within_s` is left out, with a warning, rather than
        failing the work (whose end is what must be recorded)."""
        try:
            await self.append_retrying(run_id, type_, data, within_s=within_s)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("%s: %s event left out: %r", run_id, type_, exc)

    async def last(self, run_id: str) -> RunEvent | None:
        """The log's last event (None when the log is empty or gone)."""
        entries = await self._redis.xrevrange(self._key(run_id), count=1)
        return _coalesce(run_id, entries)[0] if entries else None

    async def exists(self, run_id: str) -> bool:
        return bool(await self._redis.exists(self._key(run_id)))

    async def delete(self, run_ids: Sequence[str]) -> int:
        """Removes the logs of these runs (erasure, retention); returns how many existed."""
        if not run_ids:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for run_id in run_ids:  # one key per command: each run's log has a slot of its own
            pipe.unlink(self._key(run_id))
        return sum(int(n) for n in await pipe.execute())

    async def read(
        self, run_id: str, after: str | None = None, *, follow: bool = True
    ) -> AsyncIterator[RunEvent]:
        """Events after the cursor `after` (all when None), then live ones until a terminal event.

        Raises EventsExpired when the log does not exist (never started, or expired).
        """
        key = self._key(run_id)
        last = decode_cursor(after, run_id) if after else "0-0"
        local = follow and key in self._producing
        if not local and not await self._redis.exists(key):
            raise EventsExpired("this run's events are no longer kept; read its message instead")
        # A reader of a run executing here takes its appends from before the replay on, so
        # that none made during the replay is missed (`_follow` drops what the replay gave).
        subscriber = _Subscriber(key, last, local=local)
        if local:
            self._local.setdefault(key, set()).add(subscriber)
        try:
            async for event in self._replay(run_id, key, last):
                yield event
                last = event.entry_id
                if event.terminal:
                    return
            if not follow:
                return
            async for event in self._follow(run_id, subscriber, last):
                yield event
                if event.terminal:
                    return
        finally:
            self._unregister(subscriber)

    def _unregister(self, subscriber: _Subscriber) -> None:
        if not subscriber.local:
            self._tail.unregister(subscriber)
            return
        watchers = self._local.get(subscriber.key)
        if watchers is not None:
            watchers.discard(subscriber)
            if not watchers:
                del self._local[subscriber.key]

    async def _replay(self, run_id: str, key: str, last: str) -> AsyncIterator[RunEvent]:
        """The log after `last` as it stands. A short batch is its end: what is appended
        after it reaches a follower live (a local reader was registered before the replay,
        the tail reads on from the last entry given), so no read is made to find it empty."""
        while True:
            batch = await self._redis.xrange(key, min=f"({last}", count=REPLAY_BATCH)
            for event in _coalesce(run_id, batch):
                yield event
            if len(batch) < REPLAY_BATCH:
                return
            last = _text(batch[-1][0])

    async def _follow(
        self, run_id: str, subscriber: _Subscriber, last: str
    ) -> AsyncIterator[RunEvent]:
        key = subscriber.key
        if not subscriber.local:
            subscriber.last = last
            await self._tail.register(subscriber)
        while True:
            if subscriber.local and key not in self._producing and subscriber.queue.empty():
                # the run stopped executing here before its last event reached this reader
                await self._to_tail(run_id, subscriber)
            try:
                # A timeout scope, not wait_for: on Python 3.11 wait_for makes a Task of
                # every wait, and this waits once per event of every open stream.
                async with asyncio.timeout(self._block_ms * 6 / 1000):
                    batch = await subscriber.queue.get()
            except TimeoutError:
                try:
                    gone = not await self._redis.exists(key)  # expired while we waited?
                except (RedisError, OSError) as exc:  # Redis down: the tail waits it out
                    log.warning("run events %s: %r; still waiting", run_id, exc)
                    continue
                if gone:
                    raise EventsExpired("this run's events are no longer kept") from None
                continue
            while not subscriber.queue.empty():  # a slow reader takes all that waits
                batch += subscriber.queue.get_nowait()
            if subscriber.local:  # appends made while the replay read: it gave those
                after = _position(last)
                batch = [e for e in batch if _position(_text(e[0])) > after]
            if not batch:
                continue
            if self._on_lag is not None:  # stream ids are the append time in milliseconds
                appended_ms = _position(_text(batch[-1][0]))[0]
                self._on_lag(max(0.0, time.time() - appended_ms / 1000))
            for event in _coalesce(run_id, batch):
                yield event
                last = event.entry_id

    async def _to_tail(self, run_id: str, subscriber: _Subscriber) -> None:
        """A local reader reads on from Redis, after the last entry it was given."""
        try:
            await self._tail.register(subscriber)
        except (RedisError, OSError) as exc:  # tried again after the next wait
            log.warning("run events %s: %r; still waiting", run_id, exc)
            return
        self._unregister(subscriber)  # from the local readers (`local` still says so)
        subscriber.local = False


def _flat(fields: dict[str, str]) -> list[str]:
    return [part for pair in fields.items() for part in pair]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _coalesce(run_id: str, entries: Iterable[tuple[Any, dict[Any, Any]]]) -> list[RunEvent]:
    """Decodes entries; consecutive token deltas become one (joined text, last position)."""
    events: list[RunEvent] = []
    for entry_id, fields in entries:
        type_ = _text(fields[b"t"] if b"t" in fields else fields["t"])
        raw = fields[b"d"] if b"d" in fields else fields["d"]
        data = json.loads(raw)
        event = RunEvent(run_id, _text(entry_id), type_, data)
        previous = events[-1] if events else None
        if type_ == TOKEN_DELTA and previous is not None and previous.type == TOKEN_DELTA:
            merged = {
                **data,
                "text": previous.data.get("text", "") + data.get("text", ""),
                "index": data.get("index"),
                "merged": previous.data.get("merged", 1) + data.get("merged", 1),
            }
            events[-1] = RunEvent(run_id, event.entry_id, TOKEN_DELTA, merged)
        else:
            events.append(event)
    return events
