"""A LangGraph checkpointer on plain Redis 7 / Valkey: no RediSearch, no RedisJSON.

`langgraph-checkpoint-redis` needs both modules, which most managed Redis services lack. This
one uses hashes, sorted sets and sets only, and passes `langgraph-checkpoint-conformance`
(base capabilities and all extended ones: delete_for_runs, copy_thread, prune).

Layout, per thread `t` and checkpoint namespace `n` (both length-prefixed inside keys so no
thread id can forge another's key):

    threads               set   every thread id (for `list(None)`)
    ns:<t>                set   the thread's namespaces
    ids:<t>:<n>           zset  checkpoint ids, all at score 0 (ids sort by time, lexically)
    cp:<t>:<n>            hash  checkpoint id -> (checkpoint, metadata, parent id)
    blobs:<t>:<n>         hash  channel, version -> serialized value
    writes:<t>:<n>:<id>   hash  task id, write idx -> (task id, channel, value, task path)
    run:<run id>          set   (t, n, id) of the checkpoints a run wrote

Every key of a thread expires `ttl_s` after the thread was last written (idle threads go away;
the agent rebuilds them from PostgreSQL on a miss).
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from backend.core.redis import KeySpace

_SEP = b"\x00"

# Re-arms the TTL of every key of one thread: its namespace set, and per namespace the id
# index, checkpoints, blobs and each checkpoint's writes. KEYS[1] = ns set; ARGV = ttl, prefix.
_TOUCH = """
local ttl = tonumber(ARGV[1])
local prefix = ARGV[2]
redis.call('EXPIRE', KEYS[1], ttl)
for _, ns in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  redis.call('EXPIRE', prefix .. 'ids:' .. ns, ttl)
  redis.call('EXPIRE', prefix .. 'cp:' .. ns, ttl)
  redis.call('EXPIRE', prefix .. 'blobs:' .. ns, ttl)
  for _, id in ipairs(redis.call('ZRANGE', prefix .. 'ids:' .. ns, 0, -1)) do
    redis.call('EXPIRE', prefix .. 'writes:' .. ns .. ':' .. id, ttl)
  end
end
return 1
"""


def _part(value: str) -> str:
    return f"{len(value)}/{value}"


def _pack(*fields: bytes) -> bytes:
    """Length-prefixed fields: any bytes may appear inside a field."""
    out = bytearray()
    for field in fields:
        out += len(field).to_bytes(4, "big") + field
    return bytes(out)


def _unpack(data: bytes) -> list[bytes]:
    fields, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        fields.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return fields


class RedisCheckpointSaver(BaseCheckpointSaver[str]):
    """Async-only checkpointer (the sync methods raise: Sightline runs graphs with `ainvoke`)."""

    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        *,
        ttl_s: int = 7 * 24 * 3600,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        self._redis = redis
        self._keys = keys
        self._ttl_s = ttl_s

    # -- keys ------------------------------------------------------------------------------

    def _ns_key(self, thread_id: str) -> str:
        return self._keys("ns", _part(thread_id))

    def _scope(self, thread_id: str, ns: str) -> str:
        return f"{_part(thread_id)}:{_part(ns)}"

    def _key(self, kind: str, thread_id: str, ns: str, checkpoint_id: str | None = None) -> str:
        scope = self._scope(thread_id, ns)
        return self._keys(kind, f"{scope}:{checkpoint_id}" if checkpoint_id else scope)

    # -- serialisation ---------------------------------------------------------------------

    def _dump(self, value: Any) -> bytes:
        kind, data = self.serde.dumps_typed(value)
        return kind.encode() + _SEP + data

    def _load(self, raw: bytes) -> Any:
        kind, _, data = raw.partition(_SEP)
        return self.serde.loads_typed((kind.decode(), data))

    # -- reads -------------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        checkpoint_id = get_checkpoint_id(config)
        if not checkpoint_id:
            latest = await self._redis.zrange(self._key("ids", thread_id, ns), -1, -1)
            if not latest:
                return None
            checkpoint_id = latest[0].decode()
        return await self._tuple(thread_id, ns, checkpoint_id)

    async def _tuple(
        self, thread_id: str, ns: str, checkpoint_id: str, metadata_filter: dict | None = None
    ) -> CheckpointTuple | None:
        raw = await self._redis.hget(self._key("cp", thread_id, ns), checkpoint_id)
        if raw is None:
            return None
        checkpoint_raw, metadata_raw, parent = _unpack(raw)
        metadata = self._load(metadata_raw)
        if metadata_filter and any(metadata.get(k) != v for k, v in metadata_filter.items()):
            return None
        checkpoint: Checkpoint = self._load(checkpoint_raw)
        versions = checkpoint["channel_versions"]
        channel_values: dict[str, Any] = {}
        if versions:
            fields = [self._blob_field(c, v) for c, v in versions.items()]
            blobs = await self._redis.hmget(self._key("blobs", thread_id, ns), fields)
            for channel, blob in zip(versions, blobs, strict=True):
                if blob is not None and not blob.startswith(b"empty" + _SEP):
                    channel_values[channel] = self._load(blob)
        writes = await self._redis.hgetall(self._key("writes", thread_id, ns, checkpoint_id))
        pending = sorted(
            (_unpack(value) for value in writes.values()),
            key=lambda w: (w[0], int(w[4])),
        )
        base = {"thread_id": thread_id, "checkpoint_ns": ns}
        return CheckpointTuple(
            config={"configurable": {**base, "checkpoint_id": checkpoint_id}},
            checkpoint={**checkpoint, "channel_values": channel_values},
            metadata=metadata,
            parent_config=(
                {"configurable": {**base, "checkpoint_id": parent.decode()}} if parent else None
            ),
            pending_writes=[(t.decode(), c.decode(), self._load(v)) for t, c, v, _, _p in pending],
        )

    @staticmethod
    def _blob_field(channel: str, version: str | int | float) -> str:
        return f"{channel}\x00{version}"

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        if config is not None:
            threads = [str(config["configurable"]["thread_id"])]
        else:
            threads = sorted(m.decode() for m in await self._redis.smembers(self._keys("threads")))
        wanted_ns = config["configurable"].get("checkpoint_ns") if config else None
        wanted_id = get_checkpoint_id(config) if config else None
        before_id = get_checkpoint_id(before) if before else None
        remaining = limit
        for thread_id in threads:
            namespaces = sorted(
                _scope_ns(m.decode()) for m in await self._redis.smembers(self._ns_key(thread_id))
            )
            for ns in namespaces:
                if wanted_ns is not None and ns != wanted_ns:
                    continue
                ids = [
                    i.decode()
                    for i in await self._redis.zrange(self._key("ids", thread_id, ns), 0, -1)
                ]
                for checkpoint_id in reversed(ids):
                    if wanted_id and checkpoint_id != wanted_id:
                        continue
                    if before_id and checkpoint_id >= before_id:
                        continue
                    if remaining is not None and remaining <= 0:
                        return
                    found = await self._tuple(thread_id, ns, checkpoint_id, filter)
                    if found is None:
                        continue
                    if remaining is not None:
                        remaining -= 1
                    yield found

    # -- writes ------------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        parent = configurable.get("checkpoint_id") or ""
        stored = dict(checkpoint)
        values: dict[str, Any] = stored.pop("channel_values", {})  # type: ignore[assignment]
        full_metadata = get_checkpoint_metadata(config, metadata)
        blobs = {
            self._blob_field(channel, version): (
                self._dump(values[channel]) if channel in values else b"empty" + _SEP
            )
            for channel, version in new_versions.items()
        }
        checkpoint_id = checkpoint["id"]
        record = _pack(self._dump(stored), self._dump(full_metadata), parent.encode())
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self._keys("threads"), thread_id)
            pipe.sadd(self._ns_key(thread_id), self._scope(thread_id, ns))
            pipe.zadd(self._key("ids", thread_id, ns), {checkpoint_id: 0})
            pipe.hset(self._key("cp", thread_id, ns), checkpoint_id, record)
            if blobs:
                pipe.hset(self._key("blobs", thread_id, ns), mapping=blobs)
            run_id = full_metadata.get("run_id")
            if run_id:
                run_key = self._keys("run", str(run_id))
                pipe.sadd(run_key, json.dumps([thread_id, ns, checkpoint_id]))
                pipe.expire(run_key, self._ttl_s)
            self._refresh_in(pipe, thread_id)  # after the writes, in the same round trip
            await pipe.execute()
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id,
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        key = self._key("writes", thread_id, ns, configurable["checkpoint_id"])
        async with self._redis.pipeline(transaction=True) as pipe:
            for idx, (channel, value) in enumerate(writes):
                slot = WRITES_IDX_MAP.get(channel, idx)
                field = f"{task_id}\x00{slot}"
                record = _pack(
                    task_id.encode(),
                    channel.encode(),
                    self._dump(value),
                    task_path.encode(),
                    str(slot).encode(),
                )
                if slot >= 0:
                    pipe.hsetnx(key, field, record)  # a retried task does not overwrite
                else:
                    pipe.hset(key, field, record)  # errors, interrupts: the latest wins
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def _refresh(self, thread_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._refresh_in(pipe, thread_id)
            await pipe.execute()

    def _refresh_in(self, pipe: Pipeline, thread_id: str) -> None:
        """Queues the re-arming of the thread's keys' TTLs (the script's text, not its SHA:
        inside MULTI a script Redis does not know could not be loaded and run again)."""
        pipe.eval(_TOUCH, 1, self._ns_key(thread_id), self._ttl_s, self._keys(""))
        pipe.expire(self._keys("threads"), self._ttl_s * 2)

    # -- deletion, copying, pruning ------------------------------------------------------------

    async def _thread_keys(self, thread_id: str) -> list[str]:
        keys = [self._ns_key(thread_id)]
        for scope in await self._redis.smembers(self._ns_key(thread_id)):
            scope_s = scope.decode()
            ids = await self._redis.zrange(self._keys("ids", scope_s), 0, -1)
            keys += [self._keys(kind, scope_s) for kind in ("ids", "cp", "blobs")]
            keys += [self._keys("writes", f"{scope_s}:{i.decode()}") for i in ids]
        return keys

    async def adelete_thread(self, thread_id: str) -> None:
        keys = await self._thread_keys(str(thread_id))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            pipe.srem(self._keys("threads"), str(thread_id))
            await pipe.execute()

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            run_key = self._keys("run", str(run_id))
            for member in await self._redis.smembers(run_key):
                thread_id, ns, checkpoint_id = json.loads(member)
                await self._delete_checkpoint(thread_id, ns, checkpoint_id)
            await self._redis.delete(run_key)

    async def _delete_checkpoint(self, thread_id: str, ns: str, checkpoint_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._key("ids", thread_id, ns), checkpoint_id)
            pipe.hdel(self._key("cp", thread_id, ns), checkpoint_id)
            pipe.delete(self._key("writes", thread_id, ns, checkpoint_id))
            await pipe.execute()

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        source, target = str(source_thread_id), str(target_thread_id)
        scopes = await self._redis.smembers(self._ns_key(source))
        if not scopes:
            raise ValueError(f"thread {source!r} has no checkpoints")
        for scope in scopes:
            ns = _scope_ns(scope.decode())
            ids = await self._redis.zrange(self._key("ids", source, ns), 0, -1)
            checkpoints = await self._redis.hgetall(self._key("cp", source, ns))
            blobs = await self._redis.hgetall(self._key("blobs", source, ns))
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(self._keys("threads"), target)
                pipe.sadd(self._ns_key(target), self._scope(target, ns))
                if ids:
                    pipe.zadd(self._key("ids", target, ns), dict.fromkeys(ids, 0))
                if checkpoints:
                    pipe.hset(self._key("cp", target, ns), mapping=checkpoints)
                if blobs:
                    pipe.hset(self._key("blobs", target, ns), mapping=blobs)
                for checkpoint_id in ids:
                    writes = await self._redis.hgetall(
                        self._key("writes", source, ns, checkpoint_id.decode())
                    )
                    if writes:
                        pipe.hset(
                            self._key("writes", target, ns, checkpoint_id.decode()),
                            mapping=writes,
                        )
                await pipe.execute()
        await self._refresh(target)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        if strategy not in {"keep_latest", "delete"}:
            raise ValueError(f"unknown prune strategy {strategy!r}")
        for thread_id in thread_ids:
            if strategy == "delete":
                await self.adelete_thread(thread_id)
                continue
            await self._keep_latest(str(thread_id))

    async def _keep_latest(self, thread_id: str) -> None:
        """Keeps each namespace's latest checkpoint, its writes, and the blobs it points at."""
        for scope in await self._redis.smembers(self._ns_key(thread_id)):
            ns = _scope_ns(scope.decode())
            ids = [
                i.decode() for i in await self._redis.zrange(self._key("ids", thread_id, ns), 0, -1)
            ]
            if len(ids) <= 1:
                continue
            latest = await self._tuple(thread_id, ns, ids[-1])
            keep_blobs = (
                {self._blob_field(c, v) for c, v in latest.checkpoint["channel_versions"].items()}
                if latest
                else set()
            )
            blob_key = self._key("blobs", thread_id, ns)
            stale_blobs = [
                f
                for f in (b.decode() for b in await self._redis.hkeys(blob_key))
                if f not in keep_blobs
            ]
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._key("ids", thread_id, ns), *ids[:-1])
                pipe.hdel(self._key("cp", thread_id, ns), *ids[:-1])
                pipe.delete(*(self._key("writes", thread_id, ns, i) for i in ids[:-1]))
                if stale_blobs:
                    pipe.hdel(blob_key, *stale_blobs)
                await pipe.execute()

    # -- the sync API is not offered -------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        raise NotImplementedError("RedisCheckpointSaver is async: use aget_tuple / ainvoke")

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        raise NotImplementedError("RedisCheckpointSaver is async: use alist / ainvoke")

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        raise NotImplementedError("RedisCheckpointSaver is async: use aput / ainvoke")

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        raise NotImplementedError("RedisCheckpointSaver is async: use aput_writes / ainvoke")

    def get_next_version(self, current: str | None, channel: None) -> str:
        # Same scheme as LangGraph's savers: zero-padded counter, then a random tiebreak.
        number = 0 if current is None else int(str(current).split(".")[0])
        return f"{number + 1:032}.{random.random():016}"  # noqa: S311 (a tiebreak)


def _scope_ns(scope: str) -> str:
    """The namespace back out of a `<len>/<thread>:<len>/<ns>` scope."""
    size, _, rest = scope.partition("/")
    rest = rest[int(size) + 1 :]  # skip the thread and the ':'
    ns_size, _, ns = rest.partition("/")
    return ns[: int(ns_size)]
