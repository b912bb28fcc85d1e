"""The knowledge base: ingestion jobs and hybrid search, tenant-scoped by row-level security.

Ingestion is a background job owned by this service: sniff -> extract (in a thread) -> chunk ->
embed (retried with backoff while the embedder is down) -> one transaction that replaces the
document's chunks and ends the job. Nothing is written before every chunk has its vector, so a
failure never leaves a half-replaced document. Re-ingesting unchanged content (same source, same
content hash, same embedding model) does nothing.

Many small documents share the work (backend.knowledge.batching): up to `max_concurrent_jobs`
jobs extract at once, and their chunks are then embedded side by side up to a budget counted
in chunks, so that the chunks of many documents share a forward pass; documents ready within
`store_batch_delay_s` of each other are stored in one transaction (bulk inserts, the lexeme
counts updated once for the batch). A batch that fails for a reason other than an outage is
stored again document by document: one bad document fails alone. Progress is reported every
`progress_chunks` chunks.

A job holds a lease (backend.core.leases) like a chat run. When its replica dies, another one
(or the same, restarted) takes the job over and starts it again from the upload stored with it,
up to `job_max_attempts` times, then fails it with WORKER_LOST. Every step retries through a
PostgreSQL or Redis outage of up to `outage_retry_s`; a longer one leaves the job to recovery.
The row is always written before the stream's terminal event, and recovery appends the event a
row calls for when its stream lacks it: the two end in agreement.

Search ranks by vector (HNSW, cosine) and by full text (tsvector, BM25) separately and fuses
the two rankings (backend.knowledge.fusion: by score, weighted by the text ranking's confidence,
or by reciprocal rank). The text ranking matches any of the
query's rarer words (OR), as keyword search in a hybrid should: requiring all of them finds
nothing for most natural-language questions. Its matches are scored by BM25 in PostgreSQL, in
the query that finds them: IDF from the tenant's document frequencies (lexeme_stats), term
frequencies from each chunk's tsvector, length normalised by the tenant's average chunk length.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum, StrEnum
from typing import Any, Protocol, TypeVar

import numpy as np
from redis.asyncio import Redis
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.agents.tools import Source
from backend.auth.principal import Principal
from backend.auth.repository import plan_of
from backend.config import KnowledgeSettings
from backend.core import pagination
from backend.core.db import Database
from backend.core.leases import Work, job_leases
from backend.core.models import Chunk, Document, IngestionJob, IngestionUpload, JobStatus
from backend.core.redis import KeySpace
from backend.core.retry import is_transient, retrying
from backend.core.tasks import drain
from backend.errors import AppError, NotFound, PayloadTooLarge, ServiceUnavailable, ValidationFailed
from backend.knowledge.batching import ChunkBudget, MicroBatcher
from backend.knowledge.chunking import ChunkText, chunk
from backend.knowledge.embeddings import Embedder, EmbeddingUnavailable, embed_timed
from backend.knowledge.extract import Extracted, Section, UnreadableDocument, extract, sniff
from backend.knowledge.fusion import fuse
from backend.knowledge.versions import (
    EmbeddingVersions,
    Serving,
    Shadow,
    column_of,
    slot_map,
    vector_literal,
)
from backend.lifecycle.drift import DriftRecorder
from backend.lifecycle.policy import Route, RouteReason, split_pin
from backend.lifecycle.seeding import FIRST_VERSION
from backend.lifecycle.shadow import TOP_K, top_k_overlap
from backend.limits.budgets import Budgets, Resource
from backend.limits.pricing import compute_cost
from backend.limits.ratelimit import RateLimiter
from backend.limits.usage import UsagePart, add_usage, merged
from backend.realtime.eventlog import RunEvent, RunEventLog

log = logging.getLogger(__name__)

# has_documents: how long a tenant's "yes" is reused, how long its "no" (a document stored
# on this replica ends the "no" at once), for how many tenants at most
_STOCKED_FOR_S = 60.0
_EMPTY_FOR_S = 5.0
_STOCKED_TENANTS = 10_000

RETRY_MAX_S = 30.0
WORKER_LOST = "WORKER_LOST"
_ENDED = (JobStatus.COMPLETED.value, JobStatus.UNCHANGED.value, JobStatus.FAILED.value)
T = TypeVar("T")


class SearchMode(StrEnum):
    HYBRID = "hybrid"
    VECTOR = "vector"
    TEXT = "text"


@dataclass(frozen=True)
class SearchHit:
    chunk_id: uuid.UUID
    document_id: uuid.UUID
    document_title: str
    source: str
    text: str
    heading: str
    page: int | None
    char_start: int
    char_end: int
    score: float
    vector_rank: int | None
    text_rank: int | None
    vector_score: float | None = None  # cosine similarity to the query
    text_score: float | None = None  # BM25


@dataclass
class _Upload:
    data: bytes
    content_hash: str
    media_type: str
    source: str
    title: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    """A job as its runner needs it (the same whichever replica runs it)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    created_by: uuid.UUID | None
    upload: _Upload
    plan: str  # the tenant's: its embeddings are charged to the money budget
    usage: list[UsagePart] = field(default_factory=list)  # its embedding calls so far

    @property
    def member(self) -> str:
        return Work(self.tenant_id, self.id, self.created_by).member


@dataclass(frozen=True)
class _Failure:
    code: str
    message: str


class _EndedElsewhere(Exception):
    """The job's row ended meanwhile (another replica took the job over and ended it)."""


@dataclass
class _Ready:
    """A document extracted, chunked and embedded: what its store needs."""

    job: _Job
    title: str
    media_type: str
    pieces: list[ChunkText]
    vectors: list[list[float]]
    tag: str  # the embedding version that made the vectors (`model@version`)


class EmbeddingSpent(Protocol):
    """Prices what an embedding call made for a tenant took (see KnowledgeService.embedded)."""

    async def __call__(
        self,
        tenant_id: uuid.UUID,
        seconds: float,
        principal: Principal | None,
        subject: str,
        embedder: Embedder | None = None,  # default: the serving version's
    ) -> UsagePart: ...


# (the route, the live result, its latency, the shadow's run, the comparison) -> mirrored
Mirror = Callable[
    [Route, Any, float, Callable[[], Awaitable[Any]], Callable[[Any, Any], Mapping[str, float]]],
    bool,
]


class KnowledgeService:
    def __init__(
        self,
        *,
        db: Database,
        redis: Redis,
        keys: KeySpace,
        embedder: Embedder,
        limiter: RateLimiter,
        settings: KnowledgeSettings,
        own_embedder: bool = True,
        read_image: Callable[[bytes], Awaitable[str]] | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        # OCR for images and scanned PDF pages (the vision service's, wired by the app when
        # vision is on); without it such documents are refused with a typed error.
        self.read_image = read_image
        self._own_embedder = own_embedder
        self._budgets = budgets  # ingestion's embeddings: the money budget (None: not charged)
        self._db = db
        self._redis = redis
        self._keys = keys.child("kb")
        # which embedding version search and ingestion use (the registry's live one, once
        # every chunk has its vectors): see backend.knowledge.versions
        self.versions = EmbeddingVersions(
            db=db, redis=redis, keys=self._keys, settings=settings, base=embedder
        )
        self.drift: DriftRecorder | None = None  # each search's drift samples, when wired
        self._limiter = limiter
        self._settings = settings
        self.events = RunEventLog(redis, self._keys, ttl_after_end_s=settings.jobs_ttl_s)
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._budget = ChunkBudget(settings.max_chunks_in_flight)
        self._stores: MicroBatcher[_Ready, dict[str, Any]] = MicroBatcher(
            self._store_batch,
            delay_s=settings.store_batch_delay_s,
            max_weight=settings.store_batch_chunks,
            name="ingestion-store",
        )
        self._jobs: dict[uuid.UUID, asyncio.Task[None]] = {}
        # tenants seen with documents, until when that answer is reused (see has_documents)
        self._stocked: dict[uuid.UUID, float] = {}
        self._empty: dict[uuid.UUID, float] = {}
        self._leases = job_leases(
            redis,
            self._keys("job-leases"),
            settings,
            tasks=self._jobs,
            on_lost=self._recover_lost,
            find_unleased=self._unleased,
            name="ingestion",
        )
        self._closing = False
        # prices the compute-seconds of every embedding call made for a tenant (metrics, the
        # version's serving figures); a principal's own call (a search) is also recorded and
        # charged to their money budget there, which may refuse: BUDGET_EXCEEDED. Unset: free.
        self.embedded: EmbeddingSpent | None = None
        # runs a sampled search again on the shadow embedding version, off its path (the
        # model operations' `mirror`, when wired)
        self.mirror: Mirror | None = None

    def start(self, *, take_over: bool = True) -> None:
        """Starts renewing this replica's job leases and (with `take_over`) taking over the
        jobs of replicas that died. Without it (a one-off command), leases are not renewed."""
        self._leases.start(claim=take_over)

    async def close(self, grace_s: float) -> None:
        """Lets jobs finish for `grace_s`, then stops them: nothing is half-written, and their
        leases expire, so a replica (another, or this one restarted) takes them over."""
        self._closing = True
        await drain(self._jobs.values(), grace_s)
        await self._stores.aclose()
        await self._leases.close(grace_s)
        await self.events.close()
        await self.versions.close()
        if self._own_embedder:
            await self.versions.base.aclose()

    @property
    def embedder(self) -> Embedder:
        """The serving version's embedder (queries, and the chunks stored from now on)."""
        return self.versions.embedder

    # -- ingestion ---------------------------------------------------------------------------

    async def ingest(
        self,
        principal: Principal,
        data: bytes,
        *,
        filename: str = "",
        source: str | None = None,
        title: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> IngestionJob:
        """Accepts a document and starts its job; bad input is refused before anything runs.

        The document is stored with the job (in the transaction that accepts it), so whichever
        replica runs the job to its end, the accepted document is never lost."""
        if len(data) > self._settings.max_document_bytes:
            raise PayloadTooLarge(
                f"the document is over {self._settings.max_document_bytes} bytes",
                limit=self._settings.max_document_bytes,
            )
        # hashed once, off the event loop (documents run to megabytes)
        content_hash = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        key = (source or filename or "").strip()[:500]
        if not key:
            key = "text:" + content_hash[:16]
        media_type = sniff(data, filename or key, images=self.read_image is not None)
        await self._limiter.enforce(principal.subject, principal.plan, "ingestion")
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        if self._budgets is not None:  # money spent: refused before anything runs
            await self._budgets.admit(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                plan=principal.plan,
                subject="ingestion",
            )
        upload = _Upload(data, content_hash, media_type, key, title, meta or {})
        job = _Job(uuid.uuid4(), principal.tenant_id, principal.user_id, upload, principal.plan)
        # The lease first: should this replica die from here on, whoever claims the lease
        # finds the job (or finds none) and takes it over.
        await self._leases.acquire(job.member)
        try:
            async with self._db.session(principal.tenant_id) as session:
                row = IngestionJob(
                    id=job.id,
                    tenant_id=principal.tenant_id,
                    source=key,
                    status=JobStatus.QUEUED.value,
                    created_by=principal.user_id,
                )
                session.add(row)
                await session.flush()
                session.add(
                    IngestionUpload(
                        job_id=job.id,
                        tenant_id=principal.tenant_id,
                        data=data,
                        content_hash=upload.content_hash,
                        media_type=media_type,
                        title=title[:500] if title else None,
                        meta=upload.meta,
                        attempts=1,
                    )
                )
        except BaseException:
            try:
                await self._leases.release(job.member)
            except Exception:
                self._leases.abandon(job.member)
            raise
        try:
            await self._event(job, "IngestionQueued", {"source": key})
        finally:  # accepted: it runs (and ends, releasing its lease) whatever became of that
            self._start(job)
        return row

    def _start(self, job: _Job) -> None:
        self._jobs[job.id] = asyncio.create_task(self._run(job), name=f"ingest-{job.id}")

    async def _event(self, job: _Job, kind: str, body: dict[str, Any]) -> None:
        """A progress event (left out when Redis stays down: the job goes on)."""
        await self.events.append_optional(
            str(job.id), kind, body, within_s=self._settings.outage_retry_s
        )

    async def _read_scans(self, job: _Job, extracted: Extracted) -> list[Section]:
        """The document's sections with its scanned pages (or the image) read by OCR, in page
        order; progress is reported page by page (OCR takes about a second a page)."""
        assert self.read_image is not None
        read: dict[int | None, list[str]] = {}
        total = len(extracted.scans)
        for done, (page, image) in enumerate(extracted.scans, start=1):
            read.setdefault(page, []).append(await self.read_image(image))
            await self._event(
                job, "IngestionProgress", {"status": "reading", "done": done, "total": total}
            )
        scanned = [Section("\n\n".join(texts), page=page) for page, texts in read.items()]
        return sorted([*extracted.sections, *scanned], key=lambda s: s.page or 0)

    async def _run(self, job: _Job) -> None:
        """Runs a job to its end, which is recorded in the database first (row and document in
        one transaction), then as the stream's last event. An outage longer than
        `outage_retry_s`, or a shutdown, leaves the job to recovery: its lease expires and a
        replica (this one, restarted, or another) takes it over."""
        try:
            # the job's time starts when it does (its turn for a slot), not while it queues
            async with asyncio.timeout(None) as deadline:
                result = await self._ingest(job, deadline)
        except asyncio.CancelledError:
            # shutting down, or another replica took the job over: either way it is not ended
            # here (what was written stays unwritten: nothing is half-replaced)
            self._leases.abandon(job.member)
            self._jobs.pop(job.id, None)
            return
        except _EndedElsewhere:
            self._leases.abandon(job.member)
            self._jobs.pop(job.id, None)
            return
        except TimeoutError:
            result = _Failure("JOB_TIMEOUT", "the job ran out of time")
        except AppError as exc:
            result = _Failure(exc.code, exc.message)
        except Exception as exc:
            if is_transient(exc):  # down for longer than outage_retry_s: resumed later
                log.warning("job %s: left to recovery after an outage: %r", job.id, exc)
                self._leases.abandon(job.member)
                self._jobs.pop(job.id, None)
                return
            log.exception("ingestion job %s failed", job.id)
            result = _Failure("INTERNAL_SERVER_ERROR", "internal error")
        try:
            await asyncio.shield(self._end(job, result))
        finally:
            self._jobs.pop(job.id, None)

    async def _end(self, job: _Job, result: dict[str, Any] | _Failure) -> None:
        """Records a job's end: the row (a failure here; a success was recorded with its
        document), then the terminal event, then the lease goes."""
        try:
            if isinstance(result, _Failure):
                ended = await self._retrying(
                    lambda: self._record_failure(job, result), f"failing job {job.id}"
                )
                kind, body = "IngestionFailed", {"code": result.code, "message": result.message}
            else:
                ended = True
                kind, body = "IngestionCompleted", _job_body(result)
            if ended:
                await self.events.append_retrying(
                    str(job.id), kind, body, within_s=self._settings.outage_retry_s
                )
            if ended and self._leases.owns(job.member):
                await self._retrying(lambda: self._leases.release(job.member), "releasing a lease")
            else:  # ended elsewhere: the lease is the replica's that took the job over
                self._leases.abandon(job.member)
        except Exception as exc:
            log.warning("job %s: its end is left to recovery: %r", job.id, exc)
            self._leases.abandon(job.member)

    async def _record_failure(self, job: _Job, failure: _Failure) -> bool:
        """The row says FAILED, the upload goes and what its embeddings took so far is recorded,
        unless the job ended elsewhere (False)."""
        async with self._db.session(job.tenant_id) as session:
            row = await session.get(IngestionJob, job.id, with_for_update=True)
            if row is None or row.status in _ENDED:
                return False
            _record_usage(session, job)
            row.status = JobStatus.FAILED.value
            row.error_code = failure.code
            row.error = failure.message
            row.updated_at = datetime.now(UTC)
            await session.execute(delete(IngestionUpload).where(IngestionUpload.job_id == job.id))
        return True

    async def _begin(self, job: _Job) -> dict[str, Any] | None:
        """One unit of work: ends the job as UNCHANGED when the same content is stored already
        (its result), else marks it running (None)."""

        async def begin() -> dict[str, Any] | None:
            async with self._db.session(job.tenant_id) as session:
                existing = await session.scalar(
                    select(Document).where(Document.source == job.upload.source)
                )
                if (
                    existing is None
                    or existing.content_hash != job.upload.content_hash
                    or existing.embedding_model != self.embedder.name
                ):
                    await session.execute(
                        update(IngestionJob)
                        .where(IngestionJob.id == job.id, IngestionJob.status.not_in(_ENDED))
                        .values(
                            status=JobStatus.RUNNING.value, done=0, updated_at=datetime.now(UTC)
                        )
                    )
                    return None
                result = {
                    "status": JobStatus.UNCHANGED,
                    "document_id": existing.id,
                    "total": existing.chunk_count,
                    "done": existing.chunk_count,
                }
                await _close_job(session, job.id, result)
                return result

        return await self._retrying(begin, f"starting job {job.id}")

    async def _ingest(self, job: _Job, deadline: asyncio.Timeout) -> dict[str, Any]:
        """Extracts and chunks in one of `max_concurrent_jobs` slots, then (the slot free for
        the next job) embeds and stores within the budget of chunks in flight."""
        upload = job.upload
        async with contextlib.AsyncExitStack() as held:
            async with self._slots:
                deadline.reschedule(
                    asyncio.get_running_loop().time() + self._settings.job_timeout_s
                )
                unchanged = await self._begin(job)
                if unchanged is not None:
                    return unchanged
                extracted = await asyncio.to_thread(
                    extract,
                    upload.data,
                    upload.media_type,
                    upload.source,
                    max_pages=self._settings.max_pages,
                    scans=self.read_image is not None,
                )
                if extracted.scans:
                    extracted.sections = await self._read_scans(job, extracted)
                pieces = chunk(
                    extracted.sections,
                    max_tokens=self._settings.chunk_tokens,
                    overlap_tokens=self._settings.chunk_overlap_tokens,
                )
                if not pieces:
                    raise UnreadableDocument("the document has no text")
                if len(pieces) > self._settings.max_chunks_per_document:
                    raise UnreadableDocument(
                        f"the document makes {len(pieces)} chunks; the limit is "
                        f"{self._settings.max_chunks_per_document}"
                    )
                # the slot is held until the budget lets the chunks in: jobs that wait for
                # the budget hold no extracted text, and their time does not run
                await held.enter_async_context(self._budget.hold(len(pieces)))
            embedder = self.embedder  # one version for all of the document's chunks
            vectors = await self._embed_pieces(job, pieces, embedder)
            ready = _Ready(
                job,
                upload.title or extracted.title,
                extracted.media_type,
                pieces,
                vectors,
                embedder.name,
            )
            return await self._stores.submit(job.tenant_id, ready, weight=len(pieces))
        raise AssertionError("unreachable")  # (the exit stack swallows nothing)

    async def _embed_pieces(
        self, job: _Job, pieces: list[ChunkText], embedder: Embedder
    ) -> list[list[float]]:
        """The pieces' vectors, `progress_chunks` at a time (other jobs' chunks share the
        embedder's forward passes), with a progress event after each step; the job's row
        follows every `embed_batch` chunks."""
        total, step = len(pieces), self._settings.progress_chunks
        row_every = self._settings.embed_batch
        if total > step:  # a document of several steps: its row says how many from now on
            await self._progress(job, total=total)
        await self._event(
            job, "IngestionProgress", {"status": "running", "done": 0, "total": total}
        )
        vectors: list[list[float]] = []
        for start in range(0, total, step):
            before = len(vectors)
            vectors += await self._embed_with_retries(
                job, [p.text for p in pieces[start : start + step]], embedder=embedder
            )
            done = len(vectors)
            if done < total and done // row_every > before // row_every:
                await self._progress(job, done=done)
            await self._event(
                job, "IngestionProgress", {"status": "running", "done": done, "total": total}
            )
        return vectors

    async def _store_batch(
        self, tenant_id: Hashable, batch: list[_Ready]
    ) -> list[dict[str, Any] | BaseException]:
        """Stores a batch of a tenant's documents in one unit of work; when that fails for a
        reason other than an outage, each document again in its own, so that one bad document
        fails alone. A result, or the exception, per document."""
        assert isinstance(tenant_id, uuid.UUID)
        try:
            return await self._retrying(
                lambda: self._store(tenant_id, batch), f"storing {len(batch)} documents"
            )
        except Exception as exc:
            if len(batch) == 1 or is_transient(exc):
                return [exc] * len(batch)
            log.warning("a batch of %d documents failed (%r): storing each alone", len(batch), exc)
        results: list[dict[str, Any] | BaseException] = []
        for ready in batch:
            try:
                results += await self._retrying(
                    lambda r=ready: self._store(tenant_id, [r]),  # type: ignore[misc]
                    f"storing the document of job {ready.job.id}",
                )
            except Exception as exc:
                results.append(exc)
        return results

    async def _store(
        self, tenant_id: uuid.UUID, batch: list[_Ready]
    ) -> list[dict[str, Any] | BaseException]:
        """One unit of work: the documents and their chunks (replacing old ones) and the jobs'
        ends; _EndedElsewhere for a job that another replica took over and ended meanwhile."""
        async with self._db.session(tenant_id) as session:
            # the jobs' rows first (lock order, in id order): a replica that took a job over,
            # and ended it meanwhile, wins; nothing is written twice
            rows = {
                row.id: row
                for row in await session.scalars(
                    select(IngestionJob)
                    .where(IngestionJob.id.in_([r.job.id for r in batch]))
                    .order_by(IngestionJob.id)
                    .with_for_update()
                )
            }
            results: list[dict[str, Any] | BaseException] = [_EndedElsewhere() for _ in batch]
            going = [
                i
                for i, r in enumerate(batch)
                if (row := rows.get(r.job.id)) is not None and row.status not in _ENDED
            ]
            while going:  # in waves of distinct sources (a source twice: the later replaces)
                wave: list[int] = []
                later: list[int] = []
                for i in going:
                    taken = any(
                        batch[j].job.upload.source == batch[i].job.upload.source for j in wave
                    )
                    (later if taken else wave).append(i)
                documents = await self._write_documents(
                    session, tenant_id, [batch[i] for i in wave]
                )
                for i, document in zip(wave, documents, strict=True):
                    total = len(batch[i].pieces)
                    results[i] = {
                        "status": JobStatus.COMPLETED,
                        "document_id": document.id,
                        "total": total,
                        "done": total,
                    }
                going = later
            ended = []
            for ready, result in zip(batch, results, strict=True):
                if isinstance(result, dict):
                    _record_end(rows[ready.job.id], result)
                    _record_usage(session, ready.job)
                    ended.append(ready.job.id)
            if ended:
                await session.execute(
                    delete(IngestionUpload).where(IngestionUpload.job_id.in_(ended))
                )
        if any(isinstance(result, dict) for result in results):
            self._empty.pop(tenant_id, None)  # the tenant's next chat turn asks again
        return results

    async def _write_documents(
        self, session: AsyncSession, tenant_id: uuid.UUID, batch: list[_Ready]
    ) -> list[Document]:
        """The documents (new, or replacing those of the same sources, whose old chunks go in
        this unit of work) with their chunks, in bulk; distinct sources."""
        slots = await slot_map(session, self.versions.model)
        existing = {
            d.source: d
            for d in await session.scalars(
                select(Document)
                .where(Document.source.in_([r.job.upload.source for r in batch]))
                .order_by(Document.id)
                .with_for_update()
            )
        }
        if existing:
            replaced = [d.id for d in existing.values()]
            await _count_lexemes(session, tenant_id, replaced, sign=-1)
            await session.execute(delete(Chunk).where(Chunk.document_id.in_(replaced)))
        documents = []
        for ready in batch:
            upload = ready.job.upload
            document = existing.get(upload.source)
            if document is None:
                document = Document(
                    tenant_id=tenant_id, source=upload.source, created_by=ready.job.created_by
                )
                session.add(document)
            else:
                document.updated_at = datetime.now(UTC)
            document.title = ready.title[:500]
            document.media_type = ready.media_type
            document.content_hash = upload.content_hash
            document.size_bytes = len(upload.data)
            document.embedding_model = ready.tag
            document.meta = upload.meta
            document.chunk_count = len(ready.pieces)
            documents.append(document)
        await session.flush()  # the new documents in one statement
        await _insert_chunks(
            session,
            tenant_id=tenant_id,
            documents=[
                (d, r.pieces, r.vectors, r.tag, slots.get(r.tag, 0))
                for d, r in zip(documents, batch, strict=True)
            ],
        )
        await _count_lexemes(session, tenant_id, [d.id for d in documents], sign=1)
        return documents

    async def _embed_with_retries(
        self,
        job: _Job | None,
        texts: list[str],
        principal: Principal | None = None,
        *,
        embedder: Embedder | None = None,
    ) -> list[list[float]]:
        """The job pauses (status RETRYING, with events) while the embedder is down. Without a
        job, the call is `principal`'s own: recorded and charged as theirs (re-embedding)."""
        for attempt in range(self._settings.embedding_retries + 1):
            try:
                vectors, seconds = await embed_timed(embedder or self.embedder, texts)
                if job is not None:
                    await self._job_spent(job, seconds)
                elif principal is not None:
                    await self._embedded(principal.tenant_id, seconds, principal, "reembed")
                return vectors
            except EmbeddingUnavailable as exc:
                if attempt == self._settings.embedding_retries:
                    raise
                delay = min(RETRY_MAX_S, self._settings.embedding_retry_base_s * 2**attempt)
                where = f"job {job.id}" if job is not None else "re-embedding"
                log.warning("%s: embedder down (%s); retrying in %.1fs", where, exc, delay)
                if job is not None:
                    await self._progress(job, status=JobStatus.RETRYING)
                    await self._event(
                        job,
                        "IngestionProgress",
                        {"status": "retrying", "retryInS": delay, "reason": exc.message},
                    )
                await asyncio.sleep(delay)
                if job is not None:
                    await self._progress(job, status=JobStatus.RUNNING)
        raise AssertionError("unreachable")

    async def _job_spent(self, job: _Job, seconds: float) -> None:
        """A job's embedding call: counted for its usage record (written with its end) and its
        cost charged to the money budget of its tenant and creator, which may stop the job
        (BUDGET_EXCEEDED): a step of `progress_chunks` chunks is the most it overspends."""
        part = await self._embedded(job.tenant_id, seconds, None, "ingestion")
        job.usage.append(part)
        if self._budgets is None or part.cost <= 0:
            return
        budgets = self._budgets
        await self._retrying(
            lambda: budgets.charge(
                tenant_id=job.tenant_id,
                user_id=job.created_by,
                plan=job.plan,
                resource=Resource.COST,
                amount=float(part.cost),
                subject="ingestion",
            ),
            f"charging job {job.id}",
        )

    async def _progress(self, job: _Job, **values: Any) -> None:
        """Updates a going job's row (never one that ended: a replica that lost the job to
        another must not undo its end)."""
        values = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}

        async def update_row() -> None:
            async with self._db.session(job.tenant_id) as session:
                await session.execute(
                    update(IngestionJob)
                    .where(IngestionJob.id == job.id, IngestionJob.status.not_in(_ENDED))
                    .values(**values, updated_at=datetime.now(UTC))
                )

        await self._retrying(update_row, f"updating job {job.id}")

    def _retrying(self, step: Callable[[], Awaitable[T]], what: str) -> Awaitable[T]:
        return retrying(step, within_s=self._settings.outage_retry_s, what=what)

    # -- recovery ------------------------------------------------------------------------------

    async def _unleased(self) -> list[str]:
        """Unfinished jobs untouched for a lease and its grace (lease recovery keeps those that
        have no lease at all: Redis lost their owner's, or they predate job leases)."""
        idle = self._settings.job_lease_s + self._settings.job_lost_grace_s
        rows = await self._db.unfinished("ingestion", idle)
        return [Work(*row).member for row in rows]

    async def _recover_lost(self, member: str) -> bool:
        """A job whose replica stopped renewing its lease: resumed here from its stored upload
        (up to `job_max_attempts` starts), else failed with WORKER_LOST; a job that had ended
        gets the terminal event its row calls for, if its stream lacks one. Idempotent."""
        work = Work.of(member)
        tenant_id, job_id, job_key = work.tenant_id, work.id, str(work.id)
        if self._closing:
            self._leases.abandon(member)  # for another replica, or this one restarted
            return False
        taken = await self._retrying(
            lambda: self._take_over(tenant_id, job_id), f"taking over job {job_key}"
        )
        if isinstance(taken, _Job):
            log.warning("job %s resumed after its replica was lost", job_key)
            await self._event(taken, "IngestionProgress", {"status": "resumed", "done": 0})
            self._start(taken)  # it releases the lease when it ends
            return False
        if taken is not None:
            last = await self._retrying(lambda: self.events.last(job_key), "reading a log")
            if last is None or not last.terminal:
                kind, body = taken
                await self.events.append_retrying(
                    job_key, kind, body, within_s=self._settings.outage_retry_s
                )
        return True

    async def _take_over(
        self, tenant_id: uuid.UUID, job_id: uuid.UUID
    ) -> _Job | tuple[str, dict[str, Any]] | None:
        """One unit of work: the job to resume, or the terminal event its (ended, or now
        failed) row calls for, or None when there is no such job."""
        async with self._db.session(tenant_id) as session:
            row = await session.get(IngestionJob, job_id, with_for_update=True)
            if row is None:
                return None
            if row.status not in _ENDED:
                upload = await session.get(IngestionUpload, job_id, with_for_update=True)
                if upload is not None and upload.attempts < self._settings.job_max_attempts:
                    upload.attempts += 1
                    row.status = JobStatus.QUEUED.value
                    row.done = 0
                    row.updated_at = datetime.now(UTC)
                    return _Job(
                        job_id,
                        tenant_id,
                        row.created_by,
                        _Upload(
                            upload.data,
                            upload.content_hash,
                            upload.media_type,
                            row.source,
                            upload.title,
                            upload.meta,
                        ),
                        await plan_of(session, tenant_id),
                    )
                row.status = JobStatus.FAILED.value
                row.error_code = WORKER_LOST
                row.error = "the server running this job stopped" + (
                    f" ({upload.attempts} times)" if upload is not None else ""
                )
                row.updated_at = datetime.now(UTC)
                await session.execute(
                    delete(IngestionUpload).where(IngestionUpload.job_id == job_id)
                )
        if row.status == JobStatus.FAILED.value:
            return "IngestionFailed", {"code": row.error_code, "message": row.error or ""}
        return "IngestionCompleted", {
            "status": row.status,
            "documentId": str(row.document_id) if row.document_id else None,
            "done": row.done,
            "total": row.total,
        }

    async def job(self, principal: Principal, job_id: uuid.UUID) -> IngestionJob:
        """The job's row; while it embeds, with the progress its last event gives. The row's
        count is written at most every `embed_batch` chunks (for a document of one
        `progress_chunks` step, not until it is stored), its events at every step: from the row
        alone, a small document read 0 of 0 until it was COMPLETED N of N. Nothing is written
        here."""
        row = await self._get(principal, IngestionJob, job_id, "ingestion job")
        if row.status in _ENDED:
            return row
        try:
            last = await self.events.last(str(job_id))
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("job %s: its progress is not known (%r); its row's is given", job_id, exc)
            return row
        # counts of chunks (while a scan is read, its events count pages: left out)
        if (
            last is not None
            and last.type == "IngestionProgress"
            and last.data.get("status") == "running"
        ):
            row.total = max(row.total, int(last.data.get("total", 0)))
            row.done = max(row.done, int(last.data.get("done", 0)))
        return row

    async def job_events(
        self, principal: Principal, job_id: uuid.UUID, after: str | None
    ) -> AsyncIterator[RunEvent]:
        # authorisation: a job of the caller's tenant
        await self._get(principal, IngestionJob, job_id, "ingestion job")
        return self.events.read(str(job_id), after)

    async def reembed_stale(self, principal: Principal) -> int:
        """Re-embeds, from their stored text, the chunks of documents embedded by another model
        (until then search leaves them out: vector spaces never mix). One transaction per
        document; returns how many documents were brought up to date. The embedding calls are
        the caller's usage and cost (BUDGET_EXCEEDED stops it between documents: those done
        stay done, the rest stay stale until the next call)."""
        serving = self.versions.serving
        model = serving.tag
        vector_column, tag_column = column_of(serving.slot)
        async with self._db.session(principal.tenant_id) as session:
            stale = list(
                await session.scalars(select(Document.id).where(Document.embedding_model != model))
            )
        for document_id in stale:
            async with self._db.session(principal.tenant_id) as session:
                rows = list(
                    await session.execute(
                        select(Chunk.id, Chunk.text)
                        .where(Chunk.document_id == document_id)
                        .order_by(Chunk.ord)
                    )
                )
            vectors: list[list[float]] = []
            batch = self._settings.embed_batch
            for start in range(0, len(rows), batch):
                texts = [r.text for r in rows[start : start + batch]]
                vectors += await self._embed_with_retries(
                    None, texts, principal, embedder=serving.embedder
                )
            async with self._db.session(principal.tenant_id) as session:
                for row, vector in zip(rows, vectors, strict=True):
                    await session.execute(
                        update(Chunk)
                        .where(Chunk.id == row.id)
                        .values({vector_column: vector, tag_column: model})
                    )
                document = await session.get(Document, document_id, with_for_update=True)
                if document is not None:
                    document.embedding_model = model
        return len(stale)

    # -- documents -----------------------------------------------------------------------------

    async def documents(
        self, principal: Principal, first: int, after: str | None
    ) -> pagination.Page[Document]:
        limit = pagination.page_size(first)
        query = select(Document).order_by(Document.created_at.desc(), Document.id.desc())
        if after:
            created, ident = pagination.decode(after, "document", 2)
            try:
                key = (datetime.fromisoformat(created), uuid.UUID(ident))
            except (TypeError, ValueError):
                raise ValidationFailed("malformed cursor", field="after") from None
            query = query.where(
                (Document.created_at < key[0])
                | ((Document.created_at == key[0]) & (Document.id < key[1]))
            )
        async with self._db.session(principal.tenant_id) as session:
            rows = list(await session.scalars(query.limit(limit + 1)))
        items = rows[:limit]
        return pagination.Page(
            items=items,
            cursors=[pagination.encode("document", d.created_at.isoformat(), d.id) for d in items],
            has_next=len(rows) > limit,
        )

    async def document(self, principal: Principal, document_id: uuid.UUID) -> Document:
        return await self._get(principal, Document, document_id, "document")

    async def chunk(self, principal: Principal, chunk_id: uuid.UUID) -> Chunk:
        return await self._get(principal, Chunk, chunk_id, "chunk")

    async def _get(self, principal: Principal, model: type[T], ident: uuid.UUID, what: str) -> T:
        return await self._db.get_owned(principal.tenant_id, model, ident, what)

    async def delete(self, principal: Principal, document_id: uuid.UUID) -> None:
        async with self._db.session(principal.tenant_id) as session:
            if not await remove_document(session, principal.tenant_id, document_id):
                raise NotFound("no such document", id=str(document_id))

    # -- search --------------------------------------------------------------------------------

    async def _embedded(
        self,
        tenant_id: uuid.UUID,
        seconds: float,
        principal: Principal | None = None,
        subject: str = "search",
    ) -> UsagePart:
        if self.embedded is not None:
            return await self.embedded(tenant_id, seconds, principal, subject)
        model, version = split_pin(self.embedder.name)
        amount = compute_cost(seconds, Decimal(1))
        return UsagePart(model, version or FIRST_VERSION, "embedding", amount, Decimal(0))

    async def query_vector(
        self,
        query: str,
        principal: Principal | None = None,
        *,
        embedder: Embedder | None = None,
    ) -> list[float]:
        """The query's embedding (by `embedder`, default the serving version's), cached in
        Redis by model and text; computing it is counted for `principal` (a cached one cost
        nothing)."""
        embedder = embedder or self.embedder
        digest = hashlib.sha256(f"{embedder.name}\x00{query}".encode()).hexdigest()
        key = self._keys("qemb", digest)
        ttl = self._settings.query_cache_ttl_s
        if ttl:
            cached = await self._redis.get(key)
            if cached is not None and len(cached) == 4 * embedder.dimensions:
                return np.frombuffer(cached, dtype=np.float32).tolist()
        vectors, seconds = await embed_timed(embedder, [query])
        vector = vectors[0]
        if principal is not None:
            await self._embedded(principal.tenant_id, seconds, principal)
        if ttl:
            await self._redis.set(key, np.asarray(vector, dtype=np.float32).tobytes(), ex=ttl)
        return vector

    async def search(
        self,
        principal: Principal,
        query: str,
        k: int = 5,
        *,
        mode: SearchMode = SearchMode.HYBRID,
        metadata: dict[str, Any] | None = None,
        document_ids: list[uuid.UUID] | None = None,
        ef_search: int | None = None,
        rescore: bool = False,
    ) -> list[SearchHit]:
        query = " ".join(query.split())
        settings = self._settings
        if not query:
            raise ValidationFailed("query is empty", field="query")
        if len(query) > settings.max_query_chars:
            raise ValidationFailed(
                f"query is longer than {settings.max_query_chars} characters", field="query"
            )
        if not 1 <= k <= settings.max_k:
            raise ValidationFailed(f"k must be 1 to {settings.max_k}", field="k")
        ef = ef_search or settings.ef_search
        if not 1 <= ef <= 1000:
            raise ValidationFailed("efSearch must be 1 to 1000", field="efSearch")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationFailed("filter must be a JSON object", field="filter")
        candidates = max(settings.candidates, k)
        started = time.perf_counter()
        serving = self.versions.serving  # one version for the query and the vectors it meets
        vector = (
            None
            if mode is SearchMode.TEXT
            else await self.query_vector(query, principal, embedder=serving.embedder)
        )
        params: dict[str, Any] = {
            "model": serving.tag,
            "n": candidates,
            "k": k * 4 if rescore else k,
            "rrf": settings.rrf_k,
            "wv": settings.rrf_vector_weight,
            "wt": settings.rrf_text_weight,
            "k1": settings.bm25_k1,
            "b": settings.bm25_b,
            "common": settings.common_word_share,
            "m": settings.text_max_matches,
            "q": query,
            "v": vector_literal(vector) if vector is not None else None,
        }
        filters = _filters(serving.tag_column, metadata, document_ids, params)
        if mode is SearchMode.HYBRID:
            # The two rankings run at once on two connections (PostgreSQL serves them on two
            # cores), each returning its candidates; they are fused here.
            every = {**params, "k": candidates}
            column = serving.column
            ranked = await asyncio.gather(
                self._ranked(
                    principal, SearchMode.VECTOR, filters, every, ef, column=column, both=True
                ),
                self._ranked(
                    principal, SearchMode.TEXT, filters, every, ef, column=column, both=True
                ),
            )
            rows = fuse(ranked[0] + ranked[1], params["k"], settings)
            by_vector = ranked[0]
        else:
            rows = await self._ranked(principal, mode, filters, params, ef, column=serving.column)
            by_vector = rows if mode is SearchMode.VECTOR else []
        hits = [
            SearchHit(
                chunk_id=r["id"],
                document_id=r["document_id"],
                document_title=r["title"],
                source=r["source"],
                text=r["text"],
                heading=r["heading"],
                page=r["page"],
                char_start=r["char_start"],
                char_end=r["char_end"],
                score=float(r["score"]),
                vector_rank=r["vrank"],
                text_rank=r["trank"],
                vector_score=r["vscore"] if r["vscore"] is None else float(r["vscore"]),
                text_score=r["tscore"] if r["tscore"] is None else float(r["tscore"]),
            )
            for r in rows
        ]
        if rescore and vector is not None and hits:
            hits = await self._rescore(principal, hits, vector, k, serving.column)
        if by_vector and self.mirror is not None:
            self._mirror(principal, query, serving, by_vector, started, metadata, document_ids, ef)
        if self.drift is not None:
            model, _, version = serving.tag.partition("@")
            self.drift.search(
                model,
                version or FIRST_VERSION,
                query_chars=len(query),
                vector=vector,
                top_score=hits[0].score if hits else None,
            )
        return hits[:k]

    def _mirror(  # noqa: PLR0917 (what the search had, handed on)
        self,
        principal: Principal,
        query: str,
        serving: Serving,
        by_vector: list[dict[str, Any]],
        started: float,
        metadata: dict[str, Any] | None,
        document_ids: list[uuid.UUID] | None,
        ef: int,
    ) -> None:
        """A sampled search also runs on the policy's shadow version (its query embedding and
        its vectors), after this one and off its path, never charged; the two top-10 vector
        rankings are compared (`top10_overlap` in `modelComparison`)."""
        shadow = self.versions.sampled_shadow()
        if shadow is None or self.mirror is None:
            return
        ranked = sorted((r for r in by_vector if r["vrank"] is not None), key=lambda r: r["vrank"])
        live = [r["id"] for r in ranked[:TOP_K]]
        route = Route(self.versions.model, serving.version, RouteReason.POLICY, shadow.version)

        async def run() -> list[uuid.UUID]:
            return await self._shadow_ids(principal, query, shadow, metadata, document_ids, ef)

        self.mirror(
            route,
            live,
            time.perf_counter() - started,
            run,
            lambda a, b: {"top10_overlap": top_k_overlap(a, b)},
        )

    async def _shadow_ids(  # noqa: PLR0917
        self,
        principal: Principal,
        query: str,
        shadow: Shadow,
        metadata: dict[str, Any] | None,
        document_ids: list[uuid.UUID] | None,
        ef: int,
    ) -> list[uuid.UUID]:
        """The shadow version's top-10 chunks by vector for `query` (with the search's
        filters), embedded by it, uncharged."""
        [vector] = await shadow.embedder.embed([query])
        params: dict[str, Any] = {"v": vector_literal(vector), "model": shadow.tag, "k": TOP_K}
        filters = _filters(shadow.tag_column, metadata, document_ids, params)
        async with self._db.session(principal.tenant_id, settings=_search_settings(ef)) as session:
            rows = await session.execute(
                text(
                    f"SELECT c.id FROM chunks c WHERE {filters} "  # noqa: S608 (constant SQL)
                    f"ORDER BY c.{shadow.column} <=> CAST(:v AS vector) LIMIT :k"
                ),
                params,
            )
            return [r.id for r in rows]

    async def _ranked(
        self,
        principal: Principal,
        mode: SearchMode,
        filters: str,
        params: dict[str, Any],
        ef: int,
        *,
        column: str,
        both: bool = False,
    ) -> list[dict[str, Any]]:
        """One ranking (vector or text) in its own session: rows with their rank and scores
        (with `both`, the other signal's score too). Two round trips: the session's settings
        with its tenant, then the search."""
        async with self._db.session(principal.tenant_id, settings=_search_settings(ef)) as session:
            result = await session.execute(
                text(_search_sql(mode, filters, column, both=both)),
                {**params, "terms": self._settings.text_terms},
            )
            return [dict(r) for r in result.mappings().all()]

    async def _rescore(
        self,
        principal: Principal,
        hits: list[SearchHit],
        vector: list[float],
        k: int,
        column: str,
    ) -> list[SearchHit]:
        """Orders the fused candidates by exact cosine similarity to the query."""
        async with self._db.session(principal.tenant_id) as session:
            rows = await session.execute(
                text(
                    f"SELECT id, 1 - ({column} <=> CAST(:v AS vector)) AS sim FROM chunks "  # noqa: S608
                    "WHERE id = ANY(:ids)"
                ),
                {"v": vector_literal(vector), "ids": [h.chunk_id for h in hits]},
            )
            similarity = {r.id: float(r.sim) for r in rows}
        ranked = sorted(hits, key=lambda h: similarity.get(h.chunk_id, -1.0), reverse=True)
        return [
            SearchHit(**{**h.__dict__, "score": similarity.get(h.chunk_id, 0.0)})
            for h in ranked[:k]
        ]

    async def relevance(self, principal: Principal, query: str) -> float:
        """How close the knowledge base comes to a question: the cosine similarity of its
        nearest chunk (HNSW), 0.0 with nothing to compare."""
        query = " ".join(query.split())[: self._settings.max_query_chars]
        if not query:
            return 0.0
        serving = self.versions.serving
        vector = vector_literal(
            await self.query_vector(query, principal, embedder=serving.embedder)
        )
        ef = self._settings.ef_search
        async with self._db.session(principal.tenant_id, settings=_search_settings(ef)) as session:
            distance = await session.scalar(
                text(
                    f"SELECT {serving.column} <=> CAST(:v AS vector) AS d FROM chunks "  # noqa: S608
                    f"WHERE {serving.tag_column} = :model ORDER BY d LIMIT 1"
                ),
                {"v": vector, "model": serving.tag},
            )
        return 0.0 if distance is None else 1.0 - float(distance)

    async def similarities(
        self, principal: Principal, texts: list[str], chunk_ids: list[str]
    ) -> list[dict[str, float]]:
        """Cosine similarity of each text to each of the caller's chunks (by their stored
        embeddings): one {chunk id: similarity} per text. Chunks embedded by another model
        than this embedder, and ids that are not the tenant's chunks, are left out."""
        ids = []
        for chunk_id in chunk_ids:
            try:
                ids.append(uuid.UUID(chunk_id))
            except ValueError:
                continue
        if not texts or not ids:
            return [{} for _ in texts]
        # off the event loop (worker or endpoint)
        serving = self.versions.serving
        vectors, seconds = await embed_timed(serving.embedder, texts)
        await self._embedded(principal.tenant_id, seconds, principal)
        async with self._db.session(principal.tenant_id) as session:
            rows = await session.execute(
                text(
                    f"SELECT s.ord, c.id, 1 - (c.{serving.column} <=> CAST(s.v AS vector)) "  # noqa: S608
                    "AS sim "
                    "FROM chunks c, unnest(CAST(:vs AS text[])) WITH ORDINALITY AS s(v, ord) "
                    f"WHERE c.id = ANY(:ids) AND c.{serving.tag_column} = :model"
                ),
                {
                    "vs": [vector_literal(v) for v in vectors],
                    "ids": ids,
                    "model": serving.tag,
                },
            )
            found: list[dict[str, float]] = [{} for _ in texts]
            for r in rows:
                found[int(r.ord) - 1][str(r.id)] = float(r.sim)
        return found

    async def is_relevant(self, principal: Principal, query: str) -> bool:
        """Whether retrieving for this question is worth a sources block: the nearest chunk is
        at least `min_relevance` similar (calibrated by bench/retrieval_quality.py)."""
        return await self.relevance(principal, query) >= self._settings.min_relevance

    async def has_documents(self, principal: Principal) -> bool:
        """Whether the tenant's knowledge base holds any document (asked on every chat turn,
        before the model's first token). A yes is reused for `_STOCKED_FOR_S`: a base emptied
        meanwhile only costs a search that finds nothing. A no is reused for `_EMPTY_FOR_S`,
        and forgotten when this replica stores a document of the tenant: a first document
        counts at once here, and within seconds on other replicas (its chunks were embedded
        before it was stored, which takes longer)."""
        now = time.monotonic()
        if self._stocked.get(principal.tenant_id, 0.0) > now:
            return True
        if self._empty.get(principal.tenant_id, 0.0) > now:
            return False
        async with self._db.session(principal.tenant_id) as session:
            stocked = (await session.scalar(select(Document.id).limit(1))) is not None
        answers = self._stocked if stocked else self._empty
        if len(answers) >= _STOCKED_TENANTS:  # bounded: the oldest answers go first
            for tenant in list(answers)[: _STOCKED_TENANTS // 2]:
                del answers[tenant]
        answers[principal.tenant_id] = now + (_STOCKED_FOR_S if stocked else _EMPTY_FOR_S)
        return stocked

    async def search_knowledge(self, principal: Principal, query: str, k: int) -> list[Source]:
        """The chat agent's `search_knowledge` tool."""
        hits = await self.search(principal, query[: self._settings.max_query_chars], k)
        return [
            Source(
                chunk_id=str(h.chunk_id),
                document_id=str(h.document_id),
                title=h.document_title,
                text=h.text,
                score=h.score,
                span={
                    "page": h.page,
                    "heading": h.heading,
                    "charStart": h.char_start,
                    "charEnd": h.char_end,
                },
            )
            for h in hits
        ]


async def _insert_chunks(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    documents: list[tuple[Document, list[ChunkText], list[list[float]], str, int]],
) -> None:
    """The chunks of several documents, a thousand rows a statement; each document's vectors
    (tagged with the version that made them) go to that version's slot."""
    rows = [
        {
            "tenant_id": tenant_id,
            "document_id": document.id,
            "ord": p.ord,
            "text": p.text,
            "embedding": v if slot == 0 else None,
            "embedding_model": tag if slot == 0 else "",
            "embedding_b": v if slot == 1 else None,
            "embedding_b_model": tag if slot == 1 else None,
            "heading": p.heading,
            "page": p.page,
            "char_start": p.char_start,
            "char_end": p.char_end,
            "content_hash": p.content_hash,
            "meta": document.meta,
        }
        for document, pieces, vectors, tag, slot in documents
        for p, v in zip(pieces, vectors, strict=True)
    ]
    for start in range(0, len(rows), 1000):
        await session.execute(insert(Chunk), rows[start : start + 1000])


def _filters(
    tag_column: str,
    metadata: dict[str, Any] | None,
    document_ids: list[uuid.UUID] | None,
    params: dict[str, Any],
) -> str:
    """A search's WHERE: chunks with vectors of the `:model` tag in `tag_column`, and the
    caller's filters; their values go into `params` (`meta`, `docs`: None when unused). Built
    from constant SQL only."""
    filters = f"c.{tag_column} = :model"
    params["meta"], params["docs"] = None, None
    if metadata:
        filters += " AND c.meta @> CAST(:meta AS jsonb)"
        params["meta"] = _json(metadata)
    if document_ids:
        filters += " AND c.document_id = ANY(:docs)"
        params["docs"] = document_ids
    return filters


def _search_settings(ef: int) -> dict[str, str]:
    return {
        "hnsw.ef_search": str(int(ef)),
        "hnsw.iterative_scan": "relaxed_order",
        # every step of a search is meant to run on an index (HNSW, GIN, primary keys); left
        # to itself the planner scans the table for text matches it guesses common
        "enable_seqscan": "off",
    }


# The text query. Matching: the question's rarest lexemes (at most `terms`), leaving out those
# no chunk has and those in more than `common` of the tenant's chunks (all of them when every
# one is common or absent); few, rare terms keep the rows to score few; they are matched one at
# a time, rarest first (`words`). NULL when the question has only stop words (nothing
# matches). Scoring (BM25): every lexeme of the question counts, weighted by its IDF from the
# tenant's document frequencies (lexeme_stats), against the tenant's average chunk length (a sum
# over documents, each keeping its chunks' total).
_TEXT_QUERY = """
    terms AS (SELECT lexeme FROM unnest(to_tsvector('english', :q))),
    corpus AS (
        SELECT greatest(coalesce(sum(chunk_count), 0), 1) AS n,
               greatest(coalesce(sum(lexemes), 0), 1)::float8
                   / greatest(coalesce(sum(chunk_count), 0), 1) AS avgdl
        FROM documents
    ),
    df AS (
        SELECT t.lexeme, least(coalesce(s.ndoc, 0), (SELECT n FROM corpus)) AS ndoc
        FROM terms t LEFT JOIN lexeme_stats s ON s.lexeme = t.lexeme
    ),
    idf AS (
        SELECT lexeme, ln(1 + ((SELECT n FROM corpus) - ndoc + 0.5) / (ndoc + 0.5)) AS w FROM df
    ),
    rare AS (
        SELECT lexeme, ndoc FROM df
        WHERE ndoc > 0  -- a word no chunk has matches nothing: it must not take a place
          AND ndoc <= greatest(3, CAST(:common AS float8) * (SELECT n FROM corpus))
        ORDER BY ndoc, lexeme LIMIT :terms
    ),
    words AS (
        SELECT coalesce(
            (SELECT array_agg(lexeme ORDER BY ndoc, lexeme) FROM rare),
            (SELECT array_agg(lexeme ORDER BY ndoc, lexeme) FROM df)) AS a
    ),"""


# BM25 of the rows of a relation `m` (id, tsv, lexemes): every lexeme of the question counts,
# weighted by its IDF. A row's term frequencies are read from its tsvector: setweight marks the
# question's lexemes, ts_filter keeps them (a few rows to unnest, not the whole passage); other
# lexemes that carry that weight already find no IDF row and count for nothing. Rows without
# any of the question's lexemes are left out (they score 0).
_BM25 = """
            SELECT m.id, sum(
                i.w * f.tf * (CAST(:k1 AS float8) + 1) / (f.tf + CAST(:k1 AS float8) * (
                    1 - CAST(:b AS float8)
                    + CAST(:b AS float8) * m.lexemes / (SELECT avgdl FROM corpus)))
            ) AS score
            FROM {rows} m
            CROSS JOIN LATERAL (
                SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf
                FROM unnest(ts_filter(
                    setweight(m.tsv, 'A', (SELECT array_agg(lexeme) FROM terms)), '{{a}}'
                )) u
            ) f
            JOIN idf i ON i.lexeme = f.lexeme
            GROUP BY m.id"""


def _search_sql(
    mode: SearchMode, filters: str, column: str = "embedding", *, both: bool = False
) -> str:
    """The query for a mode. `filters` is built from constant SQL only (values are bound).

    Each row carries its rank in the mode's ranking (`vrank` or `trank`) and its score there
    (`vscore`: cosine similarity, `tscore`: BM25). With `both` (a text ranking that is to be
    fused with the vector ranking, see backend.knowledge.fusion) its candidates also carry their
    cosine similarity to the question, computed for them alone in the same query: a score
    fusion never has to guess it for a passage only the text ranking found."""
    vector = f"""
        SELECT c.id, row_number() OVER (ORDER BY c.dist, c.id) AS r, 1 - c.dist AS vs,
               NULL::float8 AS ts
        FROM (
            SELECT c.id, c.{column} <=> CAST(:v AS vector) AS dist FROM chunks c
            WHERE {filters} ORDER BY dist LIMIT :n
        ) c"""  # noqa: S608
    # The lexemes are stemmed already: the 'simple' configuration takes them as they are.
    # At most `:m` matching rows are scored, taken word by word, rarest first: a passage with
    # the question's rarest word is scored before one with only commoner words (migration
    # 0018; the matching runs in a function because under row-level security `@@` cannot use
    # GIN).
    matches = """sightline_match_terms(
                (SELECT a FROM words), :model, CAST(:meta AS jsonb), CAST(:docs AS uuid[]), :m
            )"""
    similarity = (
        f"(SELECT 1 - (c.{column} <=> CAST(:v AS vector)) FROM chunks c WHERE c.id = s.id)"  # noqa: S608
        if both
        else "NULL::float8"
    )
    full_text = f"""
        SELECT s.id, row_number() OVER (ORDER BY s.score DESC, s.id) AS r,
               {similarity} AS vs, s.score AS ts
        FROM ({_BM25.format(rows=matches)}
            ORDER BY score DESC, m.id LIMIT :n
        ) s"""  # noqa: S608
    empty = "SELECT NULL::uuid AS id, NULL::bigint AS r, NULL::float8 AS vs, NULL::float8 AS ts"
    return f"""
        WITH {_TEXT_QUERY if mode is not SearchMode.VECTOR else ""}
             v AS ({vector if mode is not SearchMode.TEXT else empty + " WHERE false"}),
             t AS ({full_text if mode is not SearchMode.VECTOR else empty + " WHERE false"}),
             fused AS (
                SELECT id, min(vr) AS vrank, min(tr) AS trank, max(vs) AS vscore,
                       max(ts) AS tscore,
                       sum(CASE WHEN vr IS NOT NULL THEN CAST(:wv AS float8)
                                ELSE CAST(:wt AS float8) END
                           / (:rrf + coalesce(vr, tr))) AS score
                FROM (SELECT id, r AS vr, NULL::bigint AS tr, vs, ts FROM v
                      UNION ALL SELECT id, NULL, r, vs, ts FROM t) ranked
                GROUP BY id ORDER BY score DESC LIMIT :k
             )
        SELECT c.id, c.document_id, d.title, d.source, c.text, c.heading, c.page,
               c.char_start, c.char_end, f.score, f.vrank, f.trank, f.vscore, f.tscore
        FROM fused f JOIN chunks c ON c.id = f.id JOIN documents d ON d.id = c.document_id
        ORDER BY f.score DESC, c.id"""  # noqa: S608


async def remove_document(
    session: AsyncSession, tenant_id: uuid.UUID, document_id: uuid.UUID
) -> bool:
    """Deletes a document with its chunks and their share of the tenant's lexeme counts (the
    caller's unit of work); False when there is no such document."""
    document = await session.get(Document, document_id, with_for_update=True)
    if document is None:
        return False
    await _count_lexemes(session, tenant_id, document.id, sign=-1)
    await session.delete(document)  # chunks cascade
    return True


async def _count_lexemes(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    documents: uuid.UUID | Collection[uuid.UUID],
    *,
    sign: int,
) -> None:
    """Adds (sign 1) or removes (-1) documents' lexemes to the tenant's document frequencies,
    and sets each document's total chunk length (BM25's average length is a sum over
    documents): its chunks' total when added, 0 when removed (its chunks are going). One
    statement for any number of documents; the counts are updated in lexeme order, so that
    concurrent transactions lock them in one order (never a deadlock)."""
    ids = [documents] if isinstance(documents, uuid.UUID) else list(documents)
    if not ids:
        return
    # ts_stat takes a query text; the ids are parsed UUIDs, so nothing can be injected.
    listed = ",".join(f"'{uuid.UUID(str(i))}'" for i in ids)
    chunks = f"SELECT tsv FROM chunks WHERE document_id IN ({listed})"  # noqa: S608
    await session.execute(
        text(
            "WITH counted AS ("
            " INSERT INTO lexeme_stats (tenant_id, lexeme, ndoc) "
            " SELECT :tenant, word, :sign * ndoc FROM ts_stat(:chunks) ORDER BY word "
            " ON CONFLICT (tenant_id, lexeme) DO UPDATE "
            " SET ndoc = lexeme_stats.ndoc + EXCLUDED.ndoc) "
            "UPDATE documents d SET lexemes = CASE WHEN :sign > 0 THEN coalesce("
            " (SELECT sum(c.lexemes) FROM chunks c WHERE c.document_id = d.id), 0) ELSE 0 END "
            "WHERE d.id = ANY(:docs)"
        ),
        {"tenant": tenant_id, "sign": sign, "chunks": chunks, "docs": ids},
    )


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _close_job(session: AsyncSession, job_id: uuid.UUID, result: dict[str, Any]) -> None:
    """Ends a job's row with its result and drops its upload (in the caller's unit of work);
    raises _EndedElsewhere when the row had ended already."""
    row = await session.get(IngestionJob, job_id, with_for_update=True)
    if row is None or row.status in _ENDED:
        raise _EndedElsewhere
    _record_end(row, result)
    await session.execute(delete(IngestionUpload).where(IngestionUpload.job_id == job_id))


def _record_usage(session: AsyncSession, job: _Job) -> None:
    """What a job's embeddings took, one record per model version (the unit of work that ends
    it: written once, with its end)."""
    add_usage(
        session,
        tenant_id=job.tenant_id,
        user_id=job.created_by,
        resource=Resource.COMPUTE_SECONDS.value,
        subject="ingestion",
        parts=merged(job.usage),
    )


def _record_end(row: IngestionJob, result: dict[str, Any]) -> None:
    row.status = result["status"].value
    row.document_id = result["document_id"]
    row.total = result["total"]
    row.done = result["done"]
    row.error_code = row.error = None
    row.updated_at = datetime.now(UTC)


def _job_body(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": str(result["status"].value),
        "documentId": str(result["document_id"]),
        "done": result["done"],
        "total": result["total"],
    }
