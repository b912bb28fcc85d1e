"""The Redis (or Valkey) client every area shares, and its key naming."""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Redis

from backend.config import RedisSettings


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


class KeySpace:
    """Builds every key from one prefix, so users of a shared Redis (tests too) never collide."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def child(self, name: str) -> KeySpace:
        return KeySpace(self(name) + ":")
