"""Which embedding version the knowledge base searches with, and the re-embedding that follows
a promotion (issue 17, item 7).

Chunks have two vector slots (migration 0016), each with its HNSW index and the tag
(`model@version`) of the vectors it holds. Search and ingestion use the serving slot with the
serving version's embedder. When the registry's live version of the knowledge base's embedding
model is another one, one replica (a Redis lock) fills the other slot with that version, chunk
batch by chunk batch across tenants, keeping its progress in `knowledge_embeddings`; search
keeps reading the serving slot all along. When no chunk lacks the new vectors, one transaction
makes the other slot the serving one and the switch is published; every replica then embeds
queries with the new version (a replica that has not heard yet still searches the old slot,
which is left as it was). A rollback is a promotion too: the old vectors are still there, so it
only fills what was ingested meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from redis.asyncio import Redis
from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import KnowledgeSettings
from backend.core.db import Database
from backend.core.models import KnowledgeEmbedding
from backend.core.models.knowledge import EMBEDDING_DIMENSIONS
from backend.core.redis import KeySpace, listen
from backend.core.tasks import cancel_and_wait
from backend.knowledge.embeddings import (
    Embedder,
    LocalEmbedder,
    OpenAIEmbedder,
    embed_timed,
)
from backend.lifecycle.policy import ModelKind, RegistrySnapshot, TrafficPolicy, split_pin
from backend.lifecycle.seeding import FIRST_VERSION

log = logging.getLogger(__name__)

_COLUMNS = (("embedding", "embedding_model"), ("embedding_b", "embedding_b_model"))
_CLOSE_OLD_AFTER_S = 30.0  # a switched-out embedder serves the calls already in flight
_RETRY_CHECKS = 6  # a failed re-embedding waits this many checks before it is tried again


class Spent(Protocol):
    """Records what embedding a tenant's chunks took (metrics and usage, never a budget)."""

    async def __call__(self, tenant_id: uuid.UUID, seconds: float, embedder: Embedder) -> None: ...


@dataclass(frozen=True, slots=True)
class Serving:
    """The vectors search reads: a slot, the tag its vectors carry, the embedder for queries."""

    slot: int
    version: str
    embedder: Embedder

    @property
    def tag(self) -> str:
        return self.embedder.name

    @property
    def column(self) -> str:
        return _COLUMNS[self.slot][0]

    @property
    def tag_column(self) -> str:
        return _COLUMNS[self.slot][1]


@dataclass(frozen=True, slots=True)
class Shadow(Serving):
    """A shadow version whose vectors fill the slot search does not read: sampled searches
    run again on it, off their path, and the top results are compared."""

    rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Reembedding:
    """An embedding model's state as the API shows it."""

    model: str
    serving_version: str
    # running, completed (switched), ready (a shadow's vectors complete), failed, cancelled;
    # None: never re-embedded
    status: str | None
    target_version: str | None
    done: int
    total: int
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


def column_of(slot: int) -> tuple[str, str]:
    """(vector column, tag column) of a slot."""
    return _COLUMNS[slot]


async def slot_map(session: AsyncSession, model: str) -> dict[str, int]:
    """Tag -> slot, read in the caller's unit of work with a key-share lock: a switch (which
    locks the row for update) waits until the chunks this unit of work writes are in, so it
    sees them."""
    row = await session.scalar(
        select(KnowledgeEmbedding)
        .where(KnowledgeEmbedding.model == model)
        .with_for_update(key_share=True, read=True)
    )
    if row is None:
        return {}
    found = {}
    for slot, tag in (
        (1 - row.serving_slot, _slot_tag(row, 1 - row.serving_slot)),
        (row.serving_slot, _slot_tag(row, row.serving_slot)),
    ):
        if tag is not None:
            found[tag] = slot  # the serving slot wins a tie
    return found


def _slot_tag(row: KnowledgeEmbedding, slot: int) -> str | None:
    return row.slot0 if slot == 0 else row.slot1


def build_version_embedder(
    model: str, tag: str, spec: Mapping[str, Any], settings: KnowledgeSettings
) -> Embedder:
    """The embedder of a registry version's spec (`EmbeddingSpec`), its vectors tagged `tag`.
    Only vectors of the knowledge base's size can be stored."""
    dimensions = int(spec.get("dimensions") or EMBEDDING_DIMENSIONS)
    if dimensions != EMBEDDING_DIMENSIONS:
        raise ValueError(
            f"{tag} makes {dimensions}-dimensional vectors; the knowledge base stores "
            f"{EMBEDDING_DIMENSIONS}"
        )
    if spec.get("provider") == "local":
        return LocalEmbedder(
            threads=settings.embedding_threads,
            runtime=settings.embedding_runtime,
            cache_dir=settings.embedding_cache_dir,
            forward_texts=settings.embedding_forward_texts,
            name=tag,
        )
    base_url = spec.get("base_url")
    if not base_url:
        raise ValueError(f"{tag}: an endpoint embedding version needs its base_url")
    key_env = spec.get("api_key_env")
    return OpenAIEmbedder(
        base_url=str(base_url),
        model=str(spec.get("model") or model),
        api_key=os.environ.get(str(key_env)) if key_env else None,
        dimensions=dimensions,
        retries=1,
        name=tag,
    )


class EmbeddingVersions:
    """This replica's view of the knowledge base's embedding versions, and (on one replica at a
    time) the re-embedding after a promotion. Owned by the knowledge service's owner: `start`,
    `close`; `registry_changed` is a registry watcher's listener."""

    def __init__(
        self,
        *,
        db: Database,
        redis: Redis,
        keys: KeySpace,
        settings: KnowledgeSettings,
        base: Embedder,
        build: Callable[[str, str, Mapping[str, Any]], Embedder] | None = None,
    ) -> None:
        self._db = db
        self._redis = redis
        self._settings = settings
        self._base = base
        self.model, version = split_pin(base.name)
        self._base_version = version or FIRST_VERSION
        self._serving = Serving(0, self._base_version, base)
        self._build = build or (
            lambda model, tag, spec: build_version_embedder(model, tag, spec, settings)
        )
        self._embedders: dict[str, Embedder] = {base.name: base}
        self._registry: RegistrySnapshot | None = None
        self._shadow: Shadow | None = None  # set once the shadow's vectors are complete
        self._lock_key = keys("reembed-lock", self.model)
        self._channel = keys("embedding-switched", self.model)
        self._token = uuid.uuid4().hex
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._job: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self.spent: Spent | None = None  # what re-embedding took, per tenant (when wired)

    @property
    def base(self) -> Embedder:
        """The embedder the settings name (its owner closes it)."""
        return self._base

    @property
    def serving(self) -> Serving:
        return self._serving

    @property
    def embedder(self) -> Embedder:
        return self._serving.embedder

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Reads (creating it on first start) the model's row, then keeps it in view."""
        async with self._db.session() as session:
            await session.execute(
                pg_insert(KnowledgeEmbedding)
                .values(
                    model=self.model,
                    serving_slot=0,
                    serving_version=self._base_version,
                    slot0=self._base.name,
                )
                .on_conflict_do_nothing(index_elements=["model"])
            )
        await self.check()
        self._tasks = [
            asyncio.create_task(self._run(), name="knowledge-embedding-versions"),
            asyncio.create_task(
                listen(
                    self._redis,
                    self._channel,
                    lambda _data: self._wake.set(),
                    stopped=lambda: self._closed,
                    name="knowledge embedding switch listener",
                ),
                name="knowledge-embedding-switch-listener",
            ),
        ]

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._tasks, *([self._job] if self._job else []), *self._retiring]
        self._tasks, self._job = [], None
        await cancel_and_wait(tasks, "shutdown")
        for tag, embedder in list(self._embedders.items()):
            if embedder is not self._base:
                with contextlib.suppress(Exception):
                    await embedder.aclose()
            self._embedders.pop(tag, None)
        with contextlib.suppress(Exception):
            await self._release()

    async def follow(self, snapshot: RegistrySnapshot) -> None:
        """Takes the serving version the database names, once, without re-embedding anything
        (a one-off command that stores chunks: `sightline ingest`)."""
        self._registry = snapshot
        async with self._db.session() as session:
            row = await session.get(KnowledgeEmbedding, self.model)
        if row is not None:
            self._follow(row)

    async def registry_changed(self, snapshot: RegistrySnapshot) -> None:
        """A registry watcher's listener: a promotion of the embedding model starts its
        re-embedding (in a task of its own) before the watcher calls this replica current."""
        self._registry = snapshot
        if self._tasks:  # started
            await self.check()

    # -- state -----------------------------------------------------------------------------

    async def state(self) -> Reembedding:
        found = await read_state(self._db, self.model)
        return found or Reembedding(
            self.model, self._serving.version, None, None, 0, 0, None, None, None
        )

    def _policy(self) -> TrafficPolicy | None:
        return self._registry.policies.get(self.model) if self._registry is not None else None

    def _live_version(self) -> tuple[str, dict[str, Any]] | None:
        """The registry's live version of the embedding model and its spec (None: no registry,
        or it does not list the model)."""
        policy = self._policy()
        if policy is None or not policy.arms:
            return None
        spec = self._spec(policy.live)
        return None if spec is None else (policy.live, spec)

    def _shadow_version(self) -> tuple[str, dict[str, Any], float] | None:
        """The policy's shadow embedding version, its spec and sample rate (None: none)."""
        policy = self._policy()
        if policy is None or policy.shadow is None:
            return None
        spec = self._spec(policy.shadow)
        return None if spec is None else (policy.shadow, spec, policy.shadow_rate)

    def sampled_shadow(self) -> Shadow | None:
        """The shadow to compare this search with, when the policy has one whose vectors are
        all in the other slot and this search is in its sample."""
        shadow = self._shadow
        if shadow is None or random.random() >= shadow.rate:  # noqa: S311 (sampling)
            return None
        return shadow

    def _tag(self, version: str) -> str:
        return self._base.name if version == self._base_version else f"{self.model}@{version}"

    def _spec(self, version: str) -> dict[str, Any] | None:
        """An embedding version's spec as this replica's registry view has it."""
        for record in (self._registry.versions if self._registry else {}).get(self.model, ()):
            if record.version == version and record.kind is ModelKind.EMBEDDING:
                return dict(record.spec)
        return None

    def _embedder(self, version: str, spec: Mapping[str, Any] | None) -> Embedder:
        tag = self._tag(version)
        found = self._embedders.get(tag)
        if found is None:
            if spec is None:
                raise LookupError(f"{tag} is not in the registry this replica holds")
            found = self._embedders[tag] = self._build(self.model, tag, spec)
        return found

    # -- the check -------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.reembed_check_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with asyncio.timeout(max(10.0, self._settings.reembed_check_s * 4)):
                    await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away: the next check tries again
                log.warning("knowledge embeddings: check failed: %r", exc)

    async def check(self) -> None:
        """Follows the serving slot the database names; starts (if this replica takes the
        lock) the re-embedding a promotion calls for."""
        async with self._db.session() as session:
            row = await session.get(KnowledgeEmbedding, self.model)
        if row is None:
            return
        self._follow(row)
        live = self._live_version()
        if live is None or self._closed:
            return
        version, _spec = live
        shadow = self._shadow_version()
        self._follow_shadow(row, shadow)
        shadowed = shadow is not None and shadow[0] != row.serving_version
        wanted = version != row.serving_version
        running_elsewhere = (
            row.status == "running"
            and row.target_version != version
            and not (shadowed and shadow is not None and row.target_version == shadow[0])
        )
        if not (wanted or running_elsewhere or shadowed or self._sweep_due(row)):
            return
        if self._failed_lately(row):
            return
        if self._job is not None and not self._job.done():
            return
        if not await self._take_lock():
            return
        self._job = asyncio.create_task(self._reembed(), name="knowledge-reembedding")

    def _follow_shadow(
        self, row: KnowledgeEmbedding, shadow: tuple[str, dict[str, Any], float] | None
    ) -> None:
        """Compares with the shadow only once its vectors are complete (`ready`)."""
        if (
            shadow is None
            or row.status != "ready"
            or row.target_version != shadow[0]
            or shadow[0] == row.serving_version
        ):
            self._shadow = None
            return
        try:
            embedder = self._embedder(shadow[0], shadow[1])
        except (LookupError, ValueError) as exc:
            log.warning("knowledge embeddings: cannot shadow %s: %s", shadow[0], exc)
            self._shadow = None
            return
        self._shadow = Shadow(1 - row.serving_slot, shadow[0], embedder, shadow[2])

    def _follow(self, row: KnowledgeEmbedding) -> None:
        if row.serving_version == self._serving.version and row.serving_slot == self._serving.slot:
            return
        try:
            embedder = self._embedder(row.serving_version, self._spec(row.serving_version))
        except (LookupError, ValueError) as exc:
            log.warning("knowledge embeddings: cannot serve %s yet: %s", row.serving_version, exc)
            return
        old = self._serving.embedder
        self._serving = Serving(row.serving_slot, row.serving_version, embedder)
        log.info(
            "knowledge embeddings: search now uses %s (slot %d)", embedder.name, row.serving_slot
        )
        if old is not embedder and old is not self._base:
            self._retire(old)

    def _retire(self, embedder: Embedder) -> None:
        self._embedders.pop(embedder.name, None)

        async def later() -> None:
            try:
                await asyncio.sleep(_CLOSE_OLD_AFTER_S)
            finally:  # closed at shutdown too
                await embedder.aclose()

        task = asyncio.create_task(later(), name=f"close-embedder-{embedder.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _failed_lately(self, row: KnowledgeEmbedding) -> bool:
        """A failed re-embedding (its endpoint down, say) is tried again after a pause of
        `_RETRY_CHECKS` checks, not at every one."""
        if row.status != "failed" or row.finished_at is None:
            return False
        pause = _RETRY_CHECKS * self._settings.reembed_check_s
        return (datetime.now(UTC) - row.finished_at).total_seconds() < pause

    def _sweep_due(self, row: KnowledgeEmbedding) -> bool:
        """Right after a switch, chunks stored by a replica that had not heard of it yet carry
        the old version only: they are re-embedded for a while after the switch."""
        if row.status != "completed" or row.finished_at is None:
            return False
        window = max(60.0, 10 * self._settings.reembed_check_s)
        return (datetime.now(UTC) - row.finished_at).total_seconds() < window

    # -- the lock --------------------------------------------------------------------------

    async def _take_lock(self) -> bool:
        ttl_ms = int(self._settings.reembed_lock_s * 1000)
        if await self._redis.set(self._lock_key, self._token, nx=True, px=ttl_ms):
            return True
        return await self._renew()

    async def _renew(self) -> bool:
        holder = await self._redis.get(self._lock_key)
        if holder is None or holder.decode() != self._token:
            return False
        await self._redis.pexpire(self._lock_key, int(self._settings.reembed_lock_s * 1000))
        return True

    async def _release(self) -> None:
        holder = await self._redis.get(self._lock_key)
        if holder is not None and holder.decode() == self._token:
            await self._redis.delete(self._lock_key)

    # -- the re-embedding ------------------------------------------------------------------

    async def _reembed(self) -> None:
        try:
            while not self._closed:
                if not await self._step():
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("knowledge embeddings: re-embedding failed: %r", exc)
            with contextlib.suppress(Exception):
                await self._set(
                    status="failed", error=str(exc)[:2000], finished_at=datetime.now(UTC)
                )
        finally:
            with contextlib.suppress(Exception):
                await self._release()

    async def _step(self) -> bool:
        """One pass of the job; False when there is nothing more to do now."""
        async with self._db.session() as session:
            row = await session.get(KnowledgeEmbedding, self.model)
        live = self._live_version()
        if row is None or live is None:
            return False
        version, spec = live
        shadow = self._shadow_version()
        if version == row.serving_version and shadow is not None and shadow[0] != version:
            await self._fill_shadow(row, shadow[0], shadow[1])
            return False
        if version == row.serving_version:
            if row.status == "running":  # the promotion was undone before the switch
                await self._set(
                    status="cancelled",
                    error=f"{row.target_version} is no longer promoted (nor the shadow): "
                    "nothing was switched",
                    finished_at=datetime.now(UTC),
                )
                return False
            if self._sweep_due(row):  # stragglers of the old version
                other = _slot_tag(row, 1 - row.serving_slot)
                embedder = self._serving_embedder(row)
                await self._fill(row.serving_slot, embedder, other, progress=False)
                if other is not None:  # their documents are the serving version's now
                    async with self._db.session() as session:
                        await session.execute(
                            text("SELECT sightline_embedding_retag(:o, :n)"),
                            {"o": other, "n": embedder.name},
                        )
            return False
        target_slot, tag = 1 - row.serving_slot, self._tag(version)
        embedder = self._embedder(version, spec)
        if row.status != "running" or row.target_version != version:
            await self._begin(row, version, target_slot, tag)
        await self._fill(target_slot, embedder, None, progress=True)
        return not await self._switch(row.serving_version, version, target_slot, tag)

    async def _fill_shadow(
        self, row: KnowledgeEmbedding, version: str, spec: dict[str, Any]
    ) -> None:
        """The shadow's vectors in the other slot (kept complete as chunks come); `ready`
        once they are, and sampled searches compare with them from then on."""
        slot, tag = 1 - row.serving_slot, self._tag(version)
        embedder = self._embedder(version, spec)
        if row.target_version != version or row.status not in ("running", "ready"):
            await self._begin(row, version, slot, tag)
        await self._fill(slot, embedder, None, progress=row.status != "ready")
        if row.status != "ready" or row.target_version != version:
            await self._set(status="ready", finished_at=datetime.now(UTC))
            log.info("knowledge embeddings: shadow %s has every chunk's vectors", tag)
            with contextlib.suppress(Exception):  # every replica compares from now on
                await self._redis.publish(self._channel, version)
        self._wake.set()

    def _serving_embedder(self, row: KnowledgeEmbedding) -> Embedder:
        return self._embedder(row.serving_version, self._spec(row.serving_version))

    async def _begin(self, row: KnowledgeEmbedding, version: str, slot: int, tag: str) -> None:
        async with self._db.session() as session:
            total = int(
                await session.scalar(
                    text("SELECT sightline_embedding_backlog_count(:s, :t, NULL)"),
                    {"s": slot, "t": tag},
                )
                or 0
            )
        log.info(
            "knowledge embeddings: re-embedding %d chunks with %s (search stays on %s)",
            total,
            tag,
            row.serving_version,
        )
        await self._set(
            status="running",
            target_version=version,
            done=0,
            total=total,
            error=None,
            started_at=datetime.now(UTC),
            finished_at=None,
            **{f"slot{slot}": tag},
        )

    async def _fill(
        self, slot: int, embedder: Embedder, other: str | None, *, progress: bool
    ) -> None:
        """Embeds every chunk whose `slot` lacks `embedder`'s vectors, a batch at a time."""
        tag, after = embedder.name, None
        while not self._closed:
            if not await self._renew():
                raise RuntimeError("lost the re-embedding lock")
            async with self._db.session() as session:
                rows = list(
                    await session.execute(
                        text(
                            "SELECT id, tenant_id, text FROM "
                            "sightline_embedding_backlog(:s, :t, :o, :a, :n)"
                        ),
                        {
                            "s": slot,
                            "t": tag,
                            "o": other,
                            "a": after,
                            "n": self._settings.reembed_batch,
                        },
                    )
                )
            if not rows:
                return
            vectors, seconds = await embed_timed(embedder, [r.text for r in rows])
            async with self._db.session() as session:
                stored = int(
                    await session.scalar(
                        text(
                            "SELECT sightline_embedding_store(:s, :t, CAST(:ids AS uuid[]), "
                            "CAST(:vs AS text[]))"
                        ),
                        {
                            "s": slot,
                            "t": tag,
                            "ids": [r.id for r in rows],
                            "vs": [vector_literal(v) for v in vectors],
                        },
                    )
                    or 0
                )
                if progress:  # chunks ingested since the start join the backlog: the total
                    done = KnowledgeEmbedding.done + stored  # grows with them, never below done
                    await session.execute(
                        update(KnowledgeEmbedding)
                        .where(KnowledgeEmbedding.model == self.model)
                        .values(done=done, total=func.greatest(KnowledgeEmbedding.total, done))
                    )
            await self._charge(rows, seconds, embedder)
            after = rows[-1].id

    async def _charge(self, rows: list[Any], seconds: float, embedder: Embedder) -> None:
        if self.spent is None:
            return
        share = Counter(r.tenant_id for r in rows)
        for tenant_id, count in share.items():
            await self.spent(tenant_id, seconds * count / len(rows), embedder)

    async def _switch(self, serving: str, version: str, slot: int, tag: str) -> bool:
        """Makes `slot` the serving one when no chunk lacks its vectors (checked under the
        row's lock: chunks being stored now are waited for); False when some still do."""
        async with self._db.session() as session:
            row = await session.get(KnowledgeEmbedding, self.model, with_for_update=True)
            if row is None or row.serving_version != serving:
                return True  # switched meanwhile: nothing to do
            left = int(
                await session.scalar(
                    text("SELECT sightline_embedding_backlog_count(:s, :t, NULL)"),
                    {"s": slot, "t": tag},
                )
                or 0
            )
            if left:
                return False
            old_tag = _slot_tag(row, row.serving_slot)
            row.serving_slot = slot
            row.serving_version = version
            row.status = "completed"
            row.done = row.total = max(row.done, row.total)
            row.finished_at = datetime.now(UTC)
            row.error = None
            if old_tag is not None:
                await session.execute(
                    text("SELECT sightline_embedding_retag(:o, :n)"), {"o": old_tag, "n": tag}
                )
        log.info("knowledge embeddings: search switched to %s (slot %d)", tag, slot)
        with contextlib.suppress(Exception):
            await self._redis.publish(self._channel, version)
        self._wake.set()
        return True

    async def _set(self, **values: Any) -> None:
        async with self._db.session() as session:
            await session.execute(
                update(KnowledgeEmbedding)
                .where(KnowledgeEmbedding.model == self.model)
                .values(**values)
            )


def vector_literal(vector: list[float]) -> str:
    """pgvector's text form of a vector."""
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


async def read_state(db: Database, model: str) -> Reembedding | None:
    """An embedding model's serving version and last re-embedding (None: the knowledge base
    never used it)."""
    async with db.session() as session:
        row = await session.get(KnowledgeEmbedding, model)
    if row is None:
        return None
    return Reembedding(
        model=row.model,
        serving_version=row.serving_version,
        status=row.status,
        target_version=row.target_version,
        done=row.done,
        total=row.total,
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
