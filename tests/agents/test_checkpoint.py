"""The Redis checkpointer against LangGraph's conformance suite, on the plain Redis at 6379
(no modules), plus what the suite does not cover: idle expiry and key isolation."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

from langgraph.checkpoint.conformance import checkpointer_test, validate
from redis.asyncio import Redis

from backend.agents.checkpoint import RedisCheckpointSaver
from backend.core.redis import KeySpace


async def test_the_conformance_suite_passes_every_capability(redis: Redis, key_prefix: str) -> None:
    @checkpointer_test(name="RedisCheckpointSaver")
    async def saver() -> AsyncIterator[RedisCheckpointSaver]:
        # a fresh key space per suite: the suite lists "all threads" and expects only its own
        yield RedisCheckpointSaver(redis, KeySpace(f"{key_prefix}{secrets.token_hex(4)}:"))

    report = await validate(saver)
    report.print_report()
    assert report.passed_all_base()
    assert report.passed_all()


async def test_threads_expire_when_idle_and_ids_cannot_forge_keys(
    redis: Redis, key_prefix: str
) -> None:
    saver = RedisCheckpointSaver(redis, KeySpace(f"{key_prefix}ttl:"), ttl_s=60)
    empty = {
        "v": 4,
        "id": "1ef0000000000000000000000000000a",
        "ts": "2026-11-26T00:00:00+00:00",
        "channel_values": {"messages": ["hi"]},
        "channel_versions": {"messages": "1"},
        "versions_seen": {},
    }
    # "a:1/b" and "a" with namespace "1/b" would collide without length-prefixed parts
    for thread, ns in (("a:1/b", ""), ("a", "1/b")):
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ns}}
        await saver.aput(config, empty, {"source": "input", "step": 0}, {"messages": "1"})
    keys = [k async for k in redis.scan_iter(match=f"{key_prefix}ttl:*")]
    assert keys
    for key in keys:
        assert 0 < await redis.ttl(key) <= 120
    listed = [t.config["configurable"] async for t in saver.alist(None)]
    assert sorted((c["thread_id"], c["checkpoint_ns"]) for c in listed) == [
        ("a", "1/b"),
        ("a:1/b", ""),
    ]
