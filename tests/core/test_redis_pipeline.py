"""Scripts queued on a pipeline by their SHA alone (backend.core.redis.ScriptedPipeline), and
batches sent on a connection held out of the pool (backend.core.redis.HeldConnection)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from backend.config import RedisSettings
from backend.core.redis import HeldConnection, ScriptedPipeline, connect_redis
from tests.conftest import REDIS_URL

INCREMENT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


async def script_exists_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


async def test_a_known_script_goes_in_the_pipelines_one_round_trip(
    redis: Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}counter"
    script = redis.register_script(INCREMENT)
    await script(keys=[key], args=[0])  # Redis knows it now
    before = await script_exists_calls(redis)
    calls = ScriptedPipeline(redis)
    calls.pipe.set(key, 1)
    index = calls.script(script, [key], [2])
    calls.pipe.get(key)
    replies = await calls.execute()
    assert index == 1
    assert replies == [True, 3, b"3"]
    assert await script_exists_calls(redis) == before  # redis-py's pipeline asks every time


async def test_a_script_redis_does_not_know_runs_once_on_its_own(
    redis: Redis, key_prefix: str
) -> None:
    """After a restart (scripts flushed) the script fails alone, having done nothing, and is
    run again by itself, which loads it: it counts once, the other commands as queued."""
    key = f"{key_prefix}counter"
    script = redis.register_script(INCREMENT)
    await redis.script_flush()
    calls = ScriptedPipeline(redis)
    calls.pipe.set(key, 1)
    index = calls.script(script, [key], [2])
    calls.pipe.get(key)
    replies = await calls.execute()
    assert replies[index] == 3
    assert replies[0] is True
    assert int(await redis.get(key)) == 3
    assert await redis.script_exists(script.sha) == [True]


async def test_a_held_connection_answers_each_command_and_returns_an_error_reply(
    redis: Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}held"
    line = HeldConnection(redis)
    try:
        replies = await line.execute(
            [("SET", key, "a"), ("INCR", key), ("APPEND", key, "b"), ("GET", key)]
        )
        assert replies[0] == b"OK"
        assert isinstance(replies[1], ResponseError)  # not a number: the rest ran all the same
        assert replies[2:] == [2, b"ab"]
        assert await line.execute([("GET", key)]) == [b"ab"]  # the same connection, in step
    finally:
        await line.close()


async def held_line_id(redis: Redis, line: HeldConnection, name: str) -> int:
    await line.execute([("CLIENT", "SETNAME", name)])
    held = [c for c in await redis.client_list() if c.get("name") == name]
    assert len(held) == 1
    return int(held[0]["id"])


async def test_a_held_connection_the_server_closed_while_idle_is_replaced_for_the_next_batch(
    redis: Redis, key_prefix: str
) -> None:
    """Redis restarted, or dropped the client, between two batches: the next batch goes out
    once, on a fresh connection, instead of failing (the first append after every outage did)."""
    client = connect_redis(REDIS_URL, RedisSettings())  # the server's own kind of pool
    key = f"{key_prefix}held"
    line = HeldConnection(client)
    try:
        await redis.client_kill_filter(_id=await held_line_id(redis, line, "held-idle"))
        assert await line.execute([("INCR", key), ("GET", key)]) == [1, b"1"]
        assert await redis.get(key) == b"1"  # counted once
        assert await line.execute([("INCR", key)]) == [2]
        pool = client.connection_pool
        await line.close()  # back in the pool: nothing left in use
        assert not pool._in_use_connections  # type: ignore[attr-defined]
    finally:
        await line.close()
        await client.aclose()


async def test_a_batch_the_connection_dropped_part_way_fails_and_is_not_sent_again(
    redis: Redis, key_prefix: str
) -> None:
    """Some replies came back: the batch reached Redis, so sending it again could apply it
    twice. It fails; the next batch takes a fresh connection."""
    client = connect_redis(REDIS_URL, RedisSettings())
    key = f"{key_prefix}held"
    line = HeldConnection(client)
    try:
        own = await held_line_id(redis, line, "held-part-way")
        with pytest.raises((RedisConnectionError, OSError)):
            await line.execute(
                [("INCR", key), ("CLIENT", "KILL", "ID", own, "SKIPME", "no"), ("INCR", key)]
            )
        assert await redis.get(key) == b"1"  # the first INCR ran, and only once
        assert await line.execute([("INCR", key)]) == [2]
    finally:
        await line.close()
        await client.aclose()


async def test_a_held_connection_fails_its_batch_when_redis_is_unreachable() -> None:
    settings = RedisSettings(connect_timeout_s=1.0)
    client = connect_redis("redis://127.0.0.1:1/0", settings)  # nothing listens there
    line = HeldConnection(client)
    try:
        with pytest.raises((RedisConnectionError, OSError)):
            await line.execute([("PING",)])
        assert not client.connection_pool._in_use_connections  # type: ignore[attr-defined]
    finally:
        await line.close()
        await client.aclose()
