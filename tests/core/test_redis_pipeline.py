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


async def test_a_held_connection_that_drops_fails_its_batch_and_the_next_one_reconnects(
    redis: Redis, key_prefix: str
) -> None:
    client = connect_redis(REDIS_URL, RedisSettings())  # the server's own kind of pool
    key = f"{key_prefix}held"
    line = HeldConnection(client)
    try:
        await line.execute([("CLIENT", "SETNAME", "held-line")])
        clients = await redis.client_list()
        held = [c for c in clients if c.get("name") == "held-line"]
        assert len(held) == 1
        await redis.client_kill_filter(_id=held[0]["id"])
        with pytest.raises((RedisConnectionError, ConnectionError, OSError)):
            await line.execute([("SET", key, "1")])
        assert await line.execute([("SET", key, "2"), ("GET", key)]) == [b"OK", b"2"]
        pool = client.connection_pool
        await line.close()  # back in the pool: nothing left in use
        assert not pool._in_use_connections  # type: ignore[attr-defined]
    finally:
        await line.close()
        await client.aclose()
