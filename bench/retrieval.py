"""The knowledge base at 100k chunks: ingestion throughput, search latency, HNSW recall.

One run, each figure next to its baseline:

1. Ingestion: real documents (docstrings of the Python standard library, as Markdown) go
   through the whole pipeline (sniff, chunk, embed with the packaged MiniLM in its worker
   process, one transaction per document, progress events) -> chunks/s. Baseline: the same
   chunk texts embedded by the same model in a plain loop, nothing else. Then --small-docs
   one-paragraph documents (five sentences of the same docstrings each) go through the same
   public path at once, as a client uploading a folder does (KnowledgeService.ingest, the
   method the ingestDocument mutation calls, --uploads at a time, every job followed to its
   end through its event stream) -> chunks/s, beside the large documents' rate of this run.
2. Scale: the table is filled to --chunks chunks of the same kind of text. Embedding 100k chunks
   on this machine would take about half an hour, so these bulk chunks are windows of three
   sentences whose vector is the normalised mean of the sentences' real MiniLM vectors (mean
   pooling over the chunk, approximately); the text, tsvector and lexeme statistics are real.
3. Search: held-out sentences as queries, through KnowledgeService.search (RLS, filters,
   fusion, the query-embedding cache warm): p50/p99 for vector, text and hybrid. Baseline: an
   exact k-NN scan (no index) of the same queries. Recall@10 of HNSW against that exact scan.
4. With --labelled: the Perl FAQ (bench/retrieval_quality.py's labelled set) is ingested among
   the filled chunks and its questions searched in each mode: nDCG@10 and recall@10 at scale,
   where a question's words also match thousands of passages that do not answer it.

Needs the Redis at 127.0.0.1:6379 and an embedded PostgreSQL (or SIGHTLINE_DATABASE_URL).
Usage: python bench/retrieval.py [--chunks 100000] [--queries 200] [--small-docs 2000]
    [--labelled]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import pkgutil
import random
import re
import shutil
import statistics
import sysconfig
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy import insert, text

from backend.auth.principal import CredentialKind, Principal
from backend.auth.scopes import ALL_SCOPES
from backend.config import DatabaseSettings, KnowledgeSettings, LimitsSettings
from backend.core.db import Database
from backend.core.embedded import EmbeddedPostgres
from backend.core.migrations import upgrade_to_head
from backend.core.models import Chunk, Document, Tenant, UserRole
from backend.core.redis import KeySpace
from backend.knowledge.embeddings import LocalEmbedder
from backend.knowledge.service import KnowledgeService, SearchMode, _count_lexemes
from backend.limits.ratelimit import RateLimiter

SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
HNSW = (
    "CREATE INDEX ix_chunks_embedding ON chunks "
    "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
)


def stdlib_modules() -> list[ModuleType]:
    """The standard library's own top-level modules, imported, in name order: from its own
    folders only (not bench/, sys.path[0] when a bench runs as a script, not PYTHONPATH's
    backend/ and tests/, not site-packages: what a bench reads stays the same whatever files
    lie beside it, and nothing beside it is imported and run). Private modules, tests, GUIs and
    modules that fail to import are left out."""
    warnings.filterwarnings("ignore")
    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip")
    paths = sysconfig.get_paths()
    roots = {str(Path(paths[name]).resolve()) for name in ("stdlib", "platstdlib")}
    modules = []
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        path = str(getattr(info.module_finder, "path", ""))
        if info.name.startswith(("_", *skip)) or not path or "site-packages" in path:
            continue
        if not any(str(Path(path).resolve()).startswith(root) for root in roots):
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # a module this machine cannot import is not read
            continue
    return modules


def stdlib_docs() -> list[tuple[str, str]]:
    """(module, Markdown) for the standard library's documented modules."""
    docs = []
    for module in stdlib_modules():
        parts = [f"# {module.__name__}\n\n{inspect.getdoc(module) or ''}"]
        for name, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if not name.startswith("_") else None
            if doc and (inspect.isfunction(member) or inspect.isclass(member)):
                parts.append(f"## {module.__name__}.{name}\n\n{doc}")
        body = "\n\n".join(parts)
        if len(body) > 2000:
            docs.append((module.__name__, body))
    return docs


def sentences_of(docs: list[tuple[str, str]]) -> list[str]:
    seen, out = set(), []
    for _, body in docs:
        for paragraph in body.split("\n\n"):
            if paragraph.startswith("#") or ">>>" in paragraph:
                continue
            for sentence in SENTENCE.split(" ".join(paragraph.split())):
                words = len(sentence.split())
                if 6 <= words <= 60 and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    random.seed(7)
    settings = KnowledgeSettings()
    async with knowledge_stack("kb", settings) as (db, service, embedder):
        async with db.session() as session:
            tenant = Tenant(slug=f"bench-{uuid.uuid4().hex[:6]}", name="Bench")
            session.add(tenant)
        principal = Principal(
            user_id=None,  # type: ignore[arg-type]
            tenant_id=tenant.id,
            role=UserRole.OWNER,
            scopes=ALL_SCOPES,
            credential=CredentialKind.API_KEY,
        )
        docs = stdlib_docs()
        random.shuffle(docs)
        sentences = sentences_of(docs)
        random.shuffle(sentences)
        queries, pool = sentences[: args.queries], sentences[args.queries :][: args.sentences]

        # 1. ingestion through the real pipeline, against the bare embedder
        started, chunks = time.perf_counter(), 0
        ingest_docs = []
        for name, body in docs:
            if chunks >= args.ingest_chunks:
                break
            job = await service.ingest(principal, body.encode(), filename=f"{name}.md")
            events = [e async for e in await service.job_events(principal, job.id, None)]
            if events[-1].type == "IngestionCompleted":
                chunks += int(events[-1].data["total"])
                ingest_docs.append(name)
        pipeline_s = time.perf_counter() - started
        async with db.session(tenant.id) as session:
            texts = list((await session.execute(text("SELECT text FROM chunks"))).scalars())
        small = await ingest_small(service, principal, sentences, args.small_docs, args.uploads)
        started = time.perf_counter()
        for i in range(0, len(texts), settings.embed_batch):
            await embedder.embed(texts[i : i + settings.embed_batch])
        bare_s = time.perf_counter() - started

        # 2. fill to --chunks (vectors from real sentence embeddings, see the docstring)
        started = time.perf_counter()
        vectors = np.asarray(await embedder.embed(pool), dtype=np.float32)
        sentence_embed_s = time.perf_counter() - started
        started = time.perf_counter()
        total = await fill(db, principal, pool, vectors, args.chunks - len(texts))
        fill_s = time.perf_counter() - started

        if os.environ.get("BENCH_EXPLAIN"):
            await explain(db, principal, service, queries[0])

        at_scale = await labelled_at_scale(db, service, principal) if args.labelled else {}

        # 3. search latency and recall
        for q in queries:  # warm the query-embedding cache: latency below is the search itself
            await service.query_vector(q)
        latency: dict[str, list[float]] = {m.value: [] for m in SearchMode}
        latency["exact k-NN scan"] = []
        recall, approx = [], {}
        modes = list(SearchMode)
        for i, q in enumerate(queries):  # the modes take turns at going first
            for mode in modes[i % 3 :] + modes[: i % 3]:
                t0 = time.perf_counter()
                hits = await service.search(principal, q, 10, mode=mode)
                latency[mode.value].append((time.perf_counter() - t0) * 1000)
                if mode is SearchMode.VECTOR:
                    approx[q] = {h.chunk_id for h in hits}
        # The exact scans in a pass of their own: each reads the whole table, which would
        # evict the index pages the next search needs and charge that to the search.
        for q in queries:
            t0 = time.perf_counter()
            exact = await exact_knn(db, principal, await service.query_vector(q), 10)
            latency["exact k-NN scan"].append((time.perf_counter() - t0) * 1000)
            recall.append(len(approx[q] & exact) / max(1, len(exact)))

        print(
            f"retrieval: {os.cpu_count()} CPUs, {total:,} chunks, {len(queries)} queries, "
            f"MiniLM-L6 (384-d) on the CPU, HNSW m=16 ef_construction=64 ef_search="
            f"{settings.ef_search}"
        )
        print(f"{'measure':44}{'value':>12}{'baseline':>12}{'ratio':>8}")
        pipe_rate, bare_rate = len(texts) / pipeline_s, len(texts) / bare_s
        print(
            f"{'ingestion chunks/s (pipeline vs embed only)':44}{pipe_rate:12.1f}"
            f"{bare_rate:12.1f}{pipe_rate / bare_rate:8.2f}"
        )
        if small["docs"]:
            small_rate = small["chunks"] / small["s"]
            print(
                f"{'small-document chunks/s (vs large documents)':44}{small_rate:12.1f}"
                f"{pipe_rate:12.1f}{small_rate / pipe_rate:8.2f}"
            )
        base = latency["exact k-NN scan"]
        for name in ("vector", "text", "hybrid"):
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                value, ref = pct(latency[name], q), pct(base, q)
                print(
                    f"{name + ' search ' + label + ' ms (vs exact scan)':44}"
                    f"{value:12.1f}{ref:12.1f}{value / ref:8.2f}"
                )
        print(f"{'HNSW recall@10 vs exact scan':44}{statistics.mean(recall):12.3f}")
        for mode, figures in at_scale.items():
            print(
                f"{'perlfaq among them, ' + mode + ' nDCG@10':44}{figures['nDCG@10']:12.3f}"
                f"  (recall@10 {figures['recall@10']:.3f})"
            )
        if small["docs"]:
            print(
                f"({small['docs']} one-paragraph documents, {small['chunks']} chunks, "
                f"{small['completed']} completed, in {small['s']:.0f} s, {args.uploads} uploads "
                f"at a time; each job's end seen in its event stream)"
            )
        print(
            f"({len(texts)} chunks from {len(ingest_docs)} documents ingested for real; "
            f"{len(pool):,} sentences embedded in {sentence_embed_s:.0f} s; bulk fill and HNSW "
            f"build {fill_s:.0f} s)"
        )


async def labelled_at_scale(
    db: Database, service: KnowledgeService, principal: Principal
) -> dict[str, dict[str, float]]:
    """The Perl FAQ (bench/retrieval_quality.py's labelled set, `apt-get install perl-doc`)
    ingested into the filled tenant, its questions searched in each mode among all the other
    chunks: nDCG@10 and recall@10 (a passage at its best chunk's place; other chunks count as
    misses). What a ranking does at scale, where a question's words also match thousands of
    passages that do not answer it."""
    from retrieval_quality import (  # it imports this module
        ingest,
        metrics,
        passage_of,
        passages_of,
        perlfaq,
    )

    labelled = perlfaq()
    await ingest(service, principal, labelled)
    async with db.session(principal.tenant_id) as session:
        rows = await session.execute(
            text(
                "SELECT c.id, c.heading FROM chunks c JOIN documents d ON d.id = c.document_id "
                "WHERE d.source LIKE 'perlfaq-%'"
            )
        )
        passage = {r.id: passage_of(r.heading) for r in rows}
    answers = [a for _, a in labelled.queries]
    figures = {}
    for mode in SearchMode:
        ranked = []
        for question, _ in labelled.queries:
            hits = await service.search(principal, question, 10, mode=mode)
            # a chunk of another document is a miss of its own (-1 - its place)
            ids = [h.chunk_id for h in hits]
            own = {c: passage.get(c, -1 - i) for i, c in enumerate(ids)}
            ranked.append(passages_of(ids, own))
        figures[mode.value] = metrics(ranked, answers)
    return figures


async def ingest_small(
    service: KnowledgeService,
    principal: Principal,
    sentences: list[str],
    count: int,
    uploads: int,
) -> dict[str, float]:
    """`count` one-paragraph documents through the public path at once, `uploads` accepted at
    a time (as a client uploading a folder), every job followed to its end by its events."""
    rng = random.Random(11)
    paragraphs = [" ".join(rng.sample(sentences, 5)) for _ in range(count)]
    gate, followers = asyncio.Semaphore(uploads), asyncio.Semaphore(uploads)

    async def one(i: int, body: str) -> tuple[str, int]:
        async with gate:
            job = await service.ingest(principal, body.encode(), filename=f"paragraph-{i}.txt")
        # followed a few at a time (each holds a database session, then a Redis connection,
        # while it waits); a stream replays from its start, so none is missed
        async with followers:
            last = [e async for e in await service.job_events(principal, job.id, None)][-1]
        return last.type, int(last.data.get("total") or 0)

    started = time.perf_counter()
    ends = await asyncio.gather(*(one(i, p) for i, p in enumerate(paragraphs)))
    return {
        "docs": count,
        "chunks": sum(total for _, total in ends),
        "completed": sum(kind == "IngestionCompleted" for kind, _ in ends),
        "s": time.perf_counter() - started,
    }


@asynccontextmanager
async def knowledge_stack(
    name: str, settings: KnowledgeSettings
) -> AsyncIterator[tuple[Database, KnowledgeService, LocalEmbedder]]:
    """A knowledge service on a migrated database (SIGHTLINE_DATABASE_URL, or an embedded
    PostgreSQL of its own) and Redis, its embedder loaded; all of it gone afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=f"sightline-bench-{name}-"))
    url, pg = os.environ.get("SIGHTLINE_DATABASE_URL"), None
    if url is None:
        pg = EmbeddedPostgres(workdir / "postgres")
        url = await asyncio.to_thread(pg.start)
    db = Database.connect(url, DatabaseSettings(url=SecretStr(url), pool_size=5))
    redis = Redis.from_url(os.environ.get("SIGHTLINE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"bench-{name}-{uuid.uuid4().hex[:6]}:"
    embedder = LocalEmbedder(timeout_s=600)  # a busy machine loads the model slowly
    service = KnowledgeService(
        db=db,
        redis=redis,
        keys=KeySpace(prefix),
        embedder=embedder,
        limiter=RateLimiter(redis, KeySpace(prefix), LimitsSettings(enabled=False)),
        settings=settings,
        own_embedder=False,
    )
    try:
        await upgrade_to_head(db.engine)
        await embedder.load()
        yield db, service, embedder
    finally:
        await service.close(5)
        await embedder.aclose()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await db.dispose()
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        shutil.rmtree(workdir, ignore_errors=True)


async def fill(
    db: Database, principal: Principal, pool: list[str], vectors: np.ndarray, count: int
) -> int:
    """Adds `count` chunks (three-sentence windows) in documents of 1,000, then rebuilds HNSW."""
    per_doc, made = 1000, 0
    async with db.engine.begin() as owner:  # DDL as the table owner, not the app role
        await owner.execute(text("DROP INDEX IF EXISTS ix_chunks_embedding"))
    while made < count:
        async with db.session(principal.tenant_id) as session:
            document = Document(
                tenant_id=principal.tenant_id,
                source=f"bulk-{made}",
                title=f"Bulk {made}",
                media_type="text/plain",
                content_hash=uuid.uuid4().hex,
                size_bytes=0,
                embedding_model=LocalEmbedder.name,
                chunk_count=min(per_doc, count - made),
            )
            session.add(document)
            await session.flush()
            rows = []
            for i in range(document.chunk_count):
                picks = random.sample(range(len(pool)), 3)
                vector = vectors[picks].mean(axis=0)
                vector /= np.linalg.norm(vector)
                body = " ".join(pool[p] for p in picks)
                rows.append(
                    {
                        "tenant_id": principal.tenant_id,
                        "document_id": document.id,
                        "ord": i,
                        "text": body,
                        "embedding": vector.tolist(),
                        "embedding_model": LocalEmbedder.name,
                        "char_start": 0,
                        "char_end": len(body),
                        "content_hash": uuid.uuid4().hex,
                    }
                )
            await session.execute(insert(Chunk), rows)
            await _count_lexemes(session, principal.tenant_id, document.id, sign=1)
            made += document.chunk_count
    async with db.engine.begin() as owner:
        await owner.execute(text("SET LOCAL statement_timeout = 0"))  # the build takes minutes
        await owner.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
        await owner.execute(text(HNSW))
        await owner.execute(text("ANALYZE chunks"))
        total = await owner.scalar(text("SELECT count(*) FROM chunks"))
    return int(total or 0)


async def explain(
    db: Database, principal: Principal, service: KnowledgeService, query: str
) -> None:
    """EXPLAIN ANALYZE of each mode's query (BENCH_EXPLAIN=1), to see where time goes."""
    from backend.knowledge.service import _search_settings, _search_sql
    from backend.knowledge.versions import vector_literal

    vector = vector_literal(await service.query_vector(query))
    params = {"model": LocalEmbedder.name, "n": 40, "k": 10, "rrf": 60, "m": 300, "q": query}
    params |= {"common": 0.1, "terms": 5, "v": vector, "meta": None, "docs": None}
    params |= {"k1": 1.2, "b": 0.75, "wv": 1.0, "wt": 1.0}
    for mode in SearchMode:
        async with db.session(principal.tenant_id, settings=_search_settings(80)) as session:
            sql = "EXPLAIN (ANALYZE, BUFFERS) " + _search_sql(mode, "c.embedding_model = :model")
            rows = await session.execute(text(sql), params)
            print(f"-- {mode.value}\n" + "\n".join(r[0] for r in rows))


async def exact_knn(
    db: Database, principal: Principal, vector: list[float], k: int
) -> set[uuid.UUID]:
    from backend.knowledge.versions import vector_literal

    literal = vector_literal(vector)
    async with db.session(principal.tenant_id) as session:
        await session.execute(text("SET LOCAL enable_indexscan = off"))
        rows = await session.execute(
            text("SELECT id FROM chunks ORDER BY embedding <=> CAST(:v AS vector) LIMIT :k"),
            {"v": literal, "k": k},
        )
        return {r.id for r in rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ingest-chunks", type=int, default=600, help="ingested for real")
    parser.add_argument("--sentences", type=int, default=6000, help="sentence pool for the fill")
    parser.add_argument(
        "--small-docs", type=int, default=2000, help="one-paragraph documents ingested at once"
    )
    parser.add_argument("--uploads", type=int, default=16, help="small documents sent at a time")
    parser.add_argument(
        "--labelled",
        action="store_true",
        help="also search the Perl FAQ's questions among the filled chunks (needs perl-doc)",
    )
    asyncio.run(main(parser.parse_args()))
