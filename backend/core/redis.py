"""The Redis (or Valkey) client every area shares, and its key naming."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from backend.config import RedisSettings

log = logging.getLogger(__name__)
LISTEN_WAKE_S = 10.0  # longest a pub/sub listener reads before it looks whether it should stop


class RedisUnreachable(RuntimeError):
    """Redis did not answer; the message is one line an operator can act on."""


def connect_redis(url: str, settings: RedisSettings) -> Redis:
    """A pooled client (no connection is opened until first use)."""
    # A blocking pool: at the connection limit a command waits for a free connection (up to
    # the socket timeout) instead of failing at once.
    pool = BlockingConnectionPool.from_url(
        url,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        health_check_interval=30,
        decode_responses=False,
        # "auto" (redis-py 8's default) makes the pool skip its check that a connection taken
        # from it is still open: after a Redis restart every connection idle since before it
        # failed its next command (a 503 each, seen in CI). Sightline uses no maintenance
        # notifications (a Redis Enterprise feature), so the check stays on.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return Redis(connection_pool=pool)


async def ping_redis(client: Redis, timeout_s: float) -> None:
    """Raises RedisUnreachable unless PING answers within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    except Exception as exc:  # any failure to answer is 'unreachable' to an operator
        kwargs = client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        raise RedisUnreachable(
            f"cannot reach Redis at {where}: {exc or type(exc).__name__}"
        ) from exc


async def listen(
    client: Redis,
    channel: str,
    deliver: Callable[[bytes], None],
    *,
    stopped: Callable[[], bool],
    name: str,
) -> None:
    """Hands every message published on `channel` to `deliver` until `stopped()`; subscribes
    again after any error (Redis restarted, connection dropped): a listener that died silently
    would miss every later message.

    Cancel it and make `stopped()` true to end it: a cancellation that lands as redis-py's
    read timeout expires can be lost (seen on Python 3.11), and the loop would read on until
    it is cancelled again (tasks.cancel_and_wait does, every second) or its read's
    LISTEN_WAKE_S ends. That read is long: every listener waking each second was a fifth of
    an idle replica's timer wakeups.
    """
    while not stopped():
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
            while not stopped():
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=LISTEN_WAKE_S
                )
                if message is not None and message.get("type") == "message":
                    deliver(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s: %s; subscribing again", name, exc)
            await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class ScriptedPipeline:
    """A non-transactional pipeline whose scripts run by their SHA alone: one round trip.

    redis-py's own way (`script(..., client=pipeline)`) asks Redis whether it knows the
    scripts (SCRIPT EXISTS) before every execute, a round trip more. Here a script Redis does
    not know (it restarted, or its scripts were flushed) fails alone with NOSCRIPT, having run
    nothing, and is run again on its own, which loads it. Queue plain commands on `pipe`."""

    def __init__(self, redis: Redis) -> None:
        self.pipe = redis.pipeline(transaction=False)
        self._scripts: dict[int, tuple[AsyncScript, list[Any], list[Any]]] = {}

    def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> int:
        """Queues a script's call; returns its index in `execute`'s replies."""
        index = len(self.pipe.command_stack)
        self._scripts[index] = (script, list(keys), list(args))
        self.pipe.evalsha(script.sha, len(keys), *keys, *args)
        return index

    async def execute(self) -> list[Any]:
        """Every reply, in the order queued; raises the first command's error, if any (the
        commands after it ran all the same)."""
        replies = await self.pipe.execute(raise_on_error=False)  # it resets the pipeline
        for index, (script, keys, args) in self._scripts.items():
            if isinstance(replies[index], NoScriptError):
                replies[index] = await script(keys=keys, args=args)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


class HeldConnection:
    """One pooled connection kept by a single task that sends batches of commands all the time
    (the event log's appender: every token of every run).

    Each redis-py pipeline takes a connection from the pool and gives it back: the pool's lock,
    its timeout scope and its bookkeeping cost more client time than packing and reading the
    commands (a quarter of a streamed token's cost here, measured). Here the connection stays
    out of the pool between batches. Its health is checked as the pool would (a PING after
    `health_check_interval` idle); a batch that fails on the wire drops the connection (its
    replies are unknown) and the next batch takes a fresh one.

    A connection the server closed while it was held (Redis restarted, or dropped the client)
    is found dead only by the next batch. When that batch fails before any reply came back on
    a connection that had served an earlier one, it is sent once more on a fresh connection,
    as redis-py retries its own pooled commands: otherwise the first batch after every Redis
    restart would fail (seen: a run failed SERVICE_UNAVAILABLE after an outage had ended).
    Not for concurrent use: one batch at a time."""

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._connection: AbstractConnection | None = None

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Every command's reply in order; an error reply is returned, not raised (the
        commands after it ran all the same). Raises when the connection fails."""
        held = self._connection is not None
        replies: list[Any] = []
        try:
            await self._exchange(commands, replies)
        except (RedisConnectionError, OSError):
            if not held or replies:  # a fresh connection failed, or the batch got part-way
                raise
            await self._exchange(commands, replies)  # the held one had died while idle
        return replies

    async def _exchange(self, commands: Sequence[Sequence[Any]], replies: list[Any]) -> None:
        connection = self._connection
        if connection is None:
            connection = self._connection = await self._pool.get_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:  # failed or cancelled mid-batch: what is on the wire is unknown
            await self._drop(connection)
            raise

    async def close(self) -> None:
        """Gives the connection back to the pool."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await self._pool.release(connection)

    async def _drop(self, connection: AbstractConnection) -> None:
        self._connection = None
        try:
            await connection.disconnect(nowait=True)
        finally:
            await self._pool.release(connection)


class KeySpace:
    """Builds every key from one prefix, so users of a shared Redis (tests too) never collide."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def child(self, name: str) -> KeySpace:
        return KeySpace(self(name) + ":")
