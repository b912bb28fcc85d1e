"""The Redis (or Valkey) client every area shares, and its key naming."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import BlockingConnectionPool, Redis

from backend.config import RedisSettings

log = logging.getLogger(__name__)


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
    read timeout expires can be lost (seen on Python 3.11), and the loop would read on.
    """
    while not stopped():
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
            while not stopped():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
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


class KeySpace:
    """Builds every key from one prefix, so users of a shared Redis (tests too) never collide."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def child(self, name: str) -> KeySpace:
        return KeySpace(self(name) + ":")
