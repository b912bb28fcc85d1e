"""Ingestion jobs whose replica went away: another replica takes each over from the upload
stored with it (or fails it once its attempts are spent), and the job's row and its event
stream always end in agreement. Two services on one database and Redis play two replicas;
tests/faults kills real server processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from contextlib import aclosing
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from backend.auth.principal import Principal
from backend.core.db import Database
from backend.core.models import Chunk, Document, IngestionJob, IngestionUpload, JobStatus
from backend.core.redis import KeySpace
from backend.knowledge.embeddings import LocalEmbedder
from backend.knowledge.service import KnowledgeService
from backend.realtime.eventlog import EventsExpired
from tests.conftest import scaled
from tests.knowledge.test_service import MODEL_CARD, database, finished, knowledge, new_principal

__all__ = ["database"]  # fixture

QUICK = {"job_lease_s": 1, "job_lost_grace_s": 1, "embed_batch": 8}
PATIENCE_S = scaled(120)
# Two replicas in turn, each waiting up to PATIENCE_S on a busy machine (the embedding worker
# may still be loading its model): more than the suite's default time limit.
pytestmark = pytest.mark.timeout(scaled(420))


class StuckEmbedder:
    """Embeds the first `works` calls, then never answers (the replica hangs mid-job)."""

    def __init__(self, inner: LocalEmbedder, works: int = 1) -> None:
        self.name, self.dimensions = inner.name, inner.dimensions
        self._inner, self._works = inner, works

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self._works <= 0:
            await asyncio.Event().wait()
        self._works -= 1
        return await self._inner.embed(texts)

    async def aclose(self) -> None:
        return None


async def progress(service: KnowledgeService, principal: Principal, job_id: uuid.UUID) -> None:
    """Waits until the job has embedded something (it is mid-job)."""
    events = await service.job_events(principal, job_id, None)
    async with asyncio.timeout(PATIENCE_S), aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if event.type == "IngestionProgress" and event.data.get("done", 0) > 0:
                return


async def row_and_upload(
    database: Database, tenant: uuid.UUID, job_id: uuid.UUID
) -> tuple[IngestionJob, IngestionUpload | None, int]:
    async with database.session(tenant) as session:
        job = await session.get(IngestionJob, job_id)
        assert job is not None
        upload = await session.get(IngestionUpload, job_id)
        chunks = await session.scalar(select(func.count()).select_from(Chunk))
    return job, upload, int(chunks or 0)


async def left_mid_job(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> tuple[Principal, IngestionJob]:
    """A job whose replica went away while it was embedding (its lease is not renewed)."""
    principal = await new_principal(database)
    first = knowledge(database, redis, key_prefix, StuckEmbedder(embedder), **QUICK)  # type: ignore[arg-type]
    job = await first.ingest(principal, MODEL_CARD.read_bytes(), filename="README.md")
    await progress(first, principal, job.id)
    await first.close(0)
    return principal, job


async def taken_over(
    database: Database,
    redis: Redis,
    key_prefix: str,
    embedder: LocalEmbedder,
    principal: Principal,
    job_id: uuid.UUID,
    **settings: object,
) -> dict:
    """The job as another replica ends it: its stream, read to the end."""
    second = knowledge(database, redis, key_prefix, embedder, **{**QUICK, **settings})
    second.start()
    try:
        async with asyncio.timeout(PATIENCE_S):
            while True:
                try:
                    return await finished(second, principal, job_id)
                except EventsExpired:  # no stream yet: the job has not been found yet
                    await asyncio.sleep(0.1)
    finally:
        await second.close(5)


async def test_a_job_left_mid_embedding_is_finished_by_another_replica(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    principal, job = await left_mid_job(database, redis, key_prefix, embedder)
    row, upload, chunks = await row_and_upload(database, principal.tenant_id, job.id)
    assert row.status in {JobStatus.RUNNING.value, JobStatus.QUEUED.value}
    assert upload is not None  # the accepted document waits for whoever takes the job over
    assert chunks == 0  # nothing half-written

    result = await taken_over(database, redis, key_prefix, embedder, principal, job.id)
    assert result["types"][-1] == "IngestionCompleted", result
    resumed = [e for e in result["events"] if e.data.get("status") == "resumed"]
    assert len(resumed) == 1
    row, upload, chunks = await row_and_upload(database, principal.tenant_id, job.id)
    assert (row.status, row.done, row.total) == (JobStatus.COMPLETED.value, chunks, chunks)
    assert upload is None  # dropped in the transaction that ended the job
    async with database.session(principal.tenant_id) as session:
        document = await session.get(Document, row.document_id)
    assert document is not None
    assert document.chunk_count == chunks > 0
    ttl = await redis.ttl(KeySpace(key_prefix).child("kb").child("run")(f"{{{job.id}}}", "events"))
    assert ttl > 0  # the ended stream expires


async def test_a_job_out_of_attempts_fails_with_worker_lost_in_row_and_stream(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    principal, job = await left_mid_job(database, redis, key_prefix, embedder)
    result = await taken_over(
        database, redis, key_prefix, embedder, principal, job.id, job_max_attempts=1
    )
    assert result["types"][-1] == "IngestionFailed"
    assert result["last"]["code"] == "WORKER_LOST"
    row, upload, chunks = await row_and_upload(database, principal.tenant_id, job.id)
    assert (row.status, row.error_code) == (JobStatus.FAILED.value, "WORKER_LOST")
    assert upload is None
    assert chunks == 0


async def test_a_job_that_ended_in_the_database_gets_its_last_event(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    """The replica stored the document, then died before the stream's terminal event: the
    stream must not stay open for good."""
    principal = await new_principal(database)
    first = knowledge(database, redis, key_prefix, embedder, **QUICK)
    job = await first.ingest(principal, MODEL_CARD.read_bytes(), filename="README.md")
    await finished(first, principal, job.id)
    await first.close(5)
    keys = KeySpace(key_prefix).child("kb")
    stream = keys.child("run")(f"{{{job.id}}}", "events")
    last = await redis.xrevrange(stream, count=1)
    await redis.xdel(stream, last[0][0])  # as if the replica died before appending it
    await redis.persist(stream)
    member = f"{principal.tenant_id}:{job.id}:"
    await redis.zadd(keys("job-leases"), {member: time.time() - 1})

    result = await taken_over(database, redis, key_prefix, embedder, principal, job.id)
    assert result["types"][-1] == "IngestionCompleted"
    assert result["last"]["status"] == "completed"
    assert [e.data.get("status") for e in result["events"]].count("resumed") == 0
    assert await redis.ttl(stream) > 0


async def test_a_job_stuck_with_no_lease_at_all_is_ended(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    """A job left RUNNING by a version without job leases (or whose lease Redis lost with its
    owner) has nothing to claim: the replicas find it in the database and end it."""
    principal = await new_principal(database)
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    async with database.session(principal.tenant_id) as session:
        stuck = IngestionJob(
            tenant_id=principal.tenant_id,
            source="stuck.txt",
            status=JobStatus.RUNNING.value,
            created_at=long_ago,
            updated_at=long_ago,
        )
        session.add(stuck)
    result = await taken_over(database, redis, key_prefix, embedder, principal, stuck.id)
    row, _, _ = await row_and_upload(database, principal.tenant_id, stuck.id)
    assert (row.status, row.error_code) == (JobStatus.FAILED.value, "WORKER_LOST")
    assert result["types"] == ["IngestionFailed"]
    assert result["last"]["code"] == "WORKER_LOST"
