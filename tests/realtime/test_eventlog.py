"""The run event log on the real Redis: cursors, replay + tail, resume with no gap or duplicate."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from backend.config import RedisSettings
from backend.core.redis import HeldConnection, KeySpace, connect_redis
from backend.errors import ValidationFailed
from backend.realtime.eventlog import EventsExpired, RunEventLog, _Subscriber, encode_cursor
from tests.conftest import REDIS_URL, scaled


@pytest.fixture
async def log(redis: Redis, key_prefix: str) -> AsyncIterator[RunEventLog]:
    events = RunEventLog(redis, KeySpace(key_prefix), block_ms=200, ttl_after_end_s=60)
    yield events
    await events.close()


async def _produce(log: RunEventLog, run: str, tokens: list[str], delay: float = 0) -> None:
    await log.append(run, "RunStarted", {})
    for i, token in enumerate(tokens):
        await log.append(run, "TokenDelta", {"text": token, "index": i})
        if delay:
            await asyncio.sleep(delay)
    await log.append(run, "RunCompleted", {"tokens": len(tokens)})


async def test_replay_then_tail_until_the_terminal_event(log: RunEventLog) -> None:
    run = uuid.uuid4().hex
    await log.append(run, "RunStarted", {})
    received: list[str] = []

    async def consume() -> None:
        async for event in log.read(run):
            received.append(event.type)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)  # the consumer is now tailing live
    await log.append(run, "TokenDelta", {"text": "Hi", "index": 0})
    await log.append(run, "RunCompleted", {})
    await asyncio.wait_for(consumer, 5)
    assert received[0] == "RunStarted"
    assert received[-1] == "RunCompleted"
    assert "TokenDelta" in received


async def test_a_slow_reader_gets_merged_deltas_never_fewer_tokens(log: RunEventLog) -> None:
    run = uuid.uuid4().hex
    tokens = [f"t{i} " for i in range(50)]
    await _produce(log, run, tokens)
    events = [e async for e in log.read(run)]
    deltas = [e for e in events if e.type == "TokenDelta"]
    assert len(deltas) == 1  # all 50 were waiting: one merged delta
    assert deltas[0].data["text"] == "".join(tokens)
    assert deltas[0].data["index"] == 49
    assert deltas[0].data["merged"] == 50


async def test_cursors_are_checked(log: RunEventLog) -> None:
    run, other = uuid.uuid4().hex, uuid.uuid4().hex
    await _produce(log, run, ["a"])
    with pytest.raises(ValidationFailed, match="another run"):
        [e async for e in log.read(run, encode_cursor(other, "1-0"))]
    for bad in ("%%%", "bm9wZQ", encode_cursor(run, "not-an-id")):
        with pytest.raises(ValidationFailed, match="malformed"):
            [e async for e in log.read(run, bad)]


async def test_unknown_or_expired_runs_are_a_typed_error(log: RunEventLog) -> None:
    with pytest.raises(EventsExpired) as expired:
        [e async for e in log.read(uuid.uuid4().hex)]
    assert expired.value.code == "RUN_EVENTS_EXPIRED"


async def test_a_finished_log_expires(redis: Redis, key_prefix: str) -> None:
    log = RunEventLog(redis, KeySpace(key_prefix), ttl_after_end_s=1)
    run = uuid.uuid4().hex
    await _produce(log, run, ["x"])
    assert await log.exists(run)
    await asyncio.sleep(1.2)
    assert not await log.exists(run)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tokens=st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=6), min_size=0, max_size=8),
    here=st.booleans(),
)
async def test_disconnect_anywhere_and_resume_with_no_gap_or_duplicate(
    log: RunEventLog, tokens: list[str], cuts: list[int], here: bool
) -> None:
    """A client that drops after any number of events and resumes from its last cursor gets
    exactly the rest, while the producer keeps going (`here`: in this process, whose readers
    take its appends as they are made)."""
    run = uuid.uuid4().hex
    if here:
        log.producing(run)
    producer = asyncio.create_task(_produce(log, run, tokens, delay=0.001))
    await asyncio.sleep(0)
    while not await log.exists(run):
        await asyncio.sleep(0.001)
    text, indexes, types, cursor = "", [], [], None
    remaining_cuts = list(cuts)
    done = False
    while not done:
        budget = remaining_cuts.pop(0) if remaining_cuts else None
        stream = log.read(run, cursor)
        seen = 0
        async for event in stream:
            types.append(event.type)
            if event.type == "TokenDelta":
                text += event.data["text"]
                indexes.append(event.data["index"])
            cursor = event.cursor
            seen += 1
            if event.terminal:
                done = True
                break
            if budget is not None and seen >= budget:
                break  # the client disconnects here
        await stream.aclose()
    await producer
    log.produced(run)
    assert text == "".join(tokens)
    assert indexes == sorted(set(indexes))  # increasing, no index twice
    assert indexes[-1] == len(tokens) - 1
    assert types.count("RunStarted") == 1
    assert types[-1] == "RunCompleted"


async def test_readers_of_a_run_executing_here_take_its_appends_without_the_live_tail(
    redis: Redis, key_prefix: str
) -> None:
    """Every event, each once and in order, the ones appended during the reader's replay
    included; the live tail reads nothing for them. When the run stops executing here before
    its end is appended (that end recorded by another replica), the reader gets the end from
    Redis."""
    log = RunEventLog(redis, KeySpace(key_prefix), block_ms=500)
    elsewhere = RunEventLog(redis, KeySpace(key_prefix), block_ms=500)
    run = uuid.uuid4().hex
    log.producing(run)
    await log.append(run, "RunStarted", {})
    received: list[tuple[str, str]] = []

    async def consume() -> None:
        async for event in log.read(run):
            received.append((event.type, event.data.get("text", "")))

    consumer = asyncio.create_task(consume())
    for i in range(30):
        await log.append(run, "TokenDelta", {"text": f"t{i} ", "index": i})
        if i % 3 == 0:
            await asyncio.sleep(0)  # the reader replays, then follows, in between appends
    async with asyncio.timeout(scaled(10)):
        while not received or received[-1][1] != "t29 ":
            await asyncio.sleep(0.01)
    assert log._tail._subscribers == {}  # nothing read through the blocking XREAD
    log.produced(run)  # it stopped here (say, its end could not be recorded here)
    await elsewhere.append(run, "RunFailed", {"code": "WORKER_LOST"})  # recovery, elsewhere
    await asyncio.wait_for(consumer, scaled(10))
    assert received[0][0] == "RunStarted"
    assert received[-1][0] == "RunFailed"
    assert "".join(t for _, t in received) == "".join(f"t{i} " for i in range(30))
    assert log._local == {}
    await log.close()
    await elsewhere.close()


async def test_many_live_readers_share_one_blocking_read(redis: Redis, key_prefix: str) -> None:
    """200 readers tailing 50 runs at once hold one blocking Redis connection, not 200."""
    client = connect_redis(REDIS_URL, RedisSettings(max_connections=20))
    log = RunEventLog(client, KeySpace(key_prefix), block_ms=500)
    runs = [uuid.uuid4().hex for _ in range(50)]
    for run in runs:
        await log.append(run, "RunStarted", {})
    texts: dict[int, str] = {}

    async def reader(i: int) -> None:
        text = ""
        async for event in log.read(runs[i % 50]):
            if event.type == "TokenDelta":
                text += event.data["text"]
        texts[i] = text

    async def blocked() -> int:
        return sum(1 for c in await redis.client_list() if c.get("cmd") == "xread")

    before = await blocked()  # other tails in this process (earlier tests' apps) count too
    readers = [asyncio.create_task(reader(i)) for i in range(200)]
    await asyncio.sleep(0.3)
    assert await blocked() - before <= 2
    for round_ in range(5):
        for run in runs:
            await log.append(run, "TokenDelta", {"text": str(round_), "index": round_})
    for run in runs:
        await log.append(run, "RunCompleted", {})
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    await log.close()
    await client.aclose()
    assert set(texts.values()) == {"01234"}


async def test_the_tails_wake_up_stream_expires_and_goes_with_the_log(
    redis: Redis, key_prefix: str
) -> None:
    """A replica's wake-up stream (written as each live reader starts) carries an expiry, so a
    replica that dies leaves nothing behind for long; a closed log deletes it."""
    log = RunEventLog(redis, KeySpace(key_prefix), block_ms=200)
    runs = [uuid.uuid4().hex for _ in range(3)]
    readers = []
    for run in runs:
        await log.append(run, "RunStarted", {})
        readers.append(asyncio.create_task(_drain(log, run)))
        await asyncio.sleep(0.05)  # each reader registers while the others wait
    wake = [key async for key in redis.scan_iter(match=f"{key_prefix}*tail-wake*")]
    assert len(wake) == 1
    assert 0 < await redis.ttl(wake[0]) <= 3600
    for run in runs:
        await log.append(run, "RunCompleted", {})
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    await log.close()
    assert not await redis.exists(wake[0])


async def _drain(log: RunEventLog, run: str) -> None:
    async for _ in log.read(run):
        pass


async def test_concurrent_appends_are_batched_and_keep_each_streams_order(
    log: RunEventLog, redis: Redis, key_prefix: str
) -> None:
    runs = [uuid.uuid4().hex for _ in range(30)]
    sent: list[int] = []
    execute = HeldConnection.execute

    async def counting(self: HeldConnection, commands: list[list[object]]) -> list[object]:
        sent.append(len(commands))
        return await execute(self, commands)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HeldConnection, "execute", counting)
        await asyncio.gather(*(_produce(log, run, [f"w{i}" for i in range(40)]) for run in runs))
    for run in runs:
        events = [e async for e in log.read(run, follow=False)]
        assert [e.type for e in events] == ["RunStarted", "TokenDelta", "RunCompleted"]
        assert events[1].data["text"] == "".join(f"w{i}" for i in range(40))  # merged, in order
        assert events[1].data["merged"] == 40
    batched = [n for n in sent if n > 1]
    assert batched  # the token appends went out in shared pipelines
    assert sum(sent) >= 30 * 40
    assert len(sent) < 30 * 40 / 4


async def test_an_append_that_cannot_reach_redis_fails_its_caller(key_prefix: str) -> None:
    dead = connect_redis("redis://127.0.0.1:1/0", RedisSettings(connect_timeout_s=0.2))
    events = RunEventLog(dead, KeySpace(key_prefix))
    try:
        results = await asyncio.gather(
            *(events.append(f"r{i}", "TokenDelta", {"text": "x"}) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, Exception) for r in results), results
    finally:
        await events.close()
        await dead.aclose()


async def test_closing_with_appends_stuck_on_the_wire_fails_them_instead_of_hanging(
    redis: Redis, key_prefix: str
) -> None:
    client = connect_redis(REDIS_URL, RedisSettings())
    events = RunEventLog(client, KeySpace(key_prefix), block_ms=100)
    await client.ping()
    await redis.execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # XADDs now wait
    try:
        stuck = [
            asyncio.create_task(events.append(f"r{i}", "TokenDelta", {"text": "x"}))
            for i in range(3)
        ]
        await asyncio.sleep(0.1)
        await events.close()  # waits block_ms + 1 s for the batch, then gives up on it
        results = await asyncio.wait_for(asyncio.gather(*stuck, return_exceptions=True), 2)
        assert all(isinstance(r, Exception) for r in results), results
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()


async def test_a_reader_resuming_behind_an_earlier_one_gets_every_entry(
    redis: Redis, key_prefix: str
) -> None:
    """A client drops its socket and resumes while its old subscriber (already handed a newer
    entry) is still registered: the live read must restart from the resumed position. It read
    on from the old subscriber's, and the resumed client never got the entry in between (the
    first token missing after a resume under CPU load)."""
    log = RunEventLog(redis, KeySpace(key_prefix), block_ms=5_000)
    run = uuid.uuid4().hex
    started = await log.append(run, "RunStarted", {})
    key = log._key(run)
    tail = log._tail
    earlier = _Subscriber(key, started.entry_id)  # the dropped client's, not yet gone
    await tail.register(earlier)
    first = await log.append(run, "TokenDelta", {"text": "alpha", "index": 0})
    assert [e[0] for e in await asyncio.wait_for(earlier.queue.get(), 10)] == [
        first.entry_id.encode()
    ]
    await asyncio.sleep(0.5)  # the tail now waits for what comes after `first`
    while getattr(tail, "_reading", {}).get(key, first.entry_id) != first.entry_id:
        await asyncio.sleep(0.01)
    resumed = _Subscriber(key, started.entry_id)  # replayed nothing: too early
    await tail.register(resumed)
    await log.append(run, "TokenDelta", {"text": "beta", "index": 1})
    entries = await asyncio.wait_for(resumed.queue.get(), 10)
    assert entries[0][0] == first.entry_id.encode()
    tail.unregister(earlier)
    tail.unregister(resumed)
    await log.close()
