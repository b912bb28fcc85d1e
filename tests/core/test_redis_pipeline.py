"""Scripts queued on a pipeline by their SHA alone (backend.core.redis.ScriptedPipeline)."""

from __future__ import annotations

from redis.asyncio import Redis

from backend.core.redis import ScriptedPipeline

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
