"""Retrieval quality: recall@1, recall@10, nDCG@10 and MRR of Sightline's search modes, next to
a plain BM25 and an exact vector search computed in the same run, on three labelled sets.

1. perlfaq: the Perl FAQ (perlfaq1-9, Debian's `perl-doc` package: `apt-get install perl-doc`),
   about 300 questions written by its authors, each labelled with its answer. The answers are
   the passages (without their question); the questions are the queries.
2. stdlib: docstrings of the Python standard library on this machine. A function's or class's
   first line (its summary, "Return the number of ...") is the query; the rest of its docstring
   is the labelled passage.
3. debian: the installed Debian packages' descriptions (/var/lib/dpkg/status). A package's
   one-line synopsis is the query, its long description the labelled passage (so the set
   follows what the machine has installed; its size is printed).

Each set goes into its own tenant through the real service (KnowledgeService.ingest: sniff,
chunk, embed with the packaged MiniLM, store), as one Markdown document per 100 passages, one
section per passage (chunks never span sections; a hit is credited to its passage, a passage's
later chunks are dropped from the ranking). Searches go through KnowledgeService.search (RLS,
the SQL of each mode) with the embedded PostgreSQL, as bench/retrieval.py does.

Baselines, same passages, same chunks: plain BM25 (Okapi, k1 1.2, b 0.75, lowercase words less
English stop words, no stemming, computed here in numpy) and exact cosine k-NN over the chunks'
stored MiniLM vectors. Hybrid fusions of those two (plain RRF, k 60) are shown too.

Tuning (--tune each, the default: leave one set out): each set is scored with what was tuned
on the other two, so every figure of a "tuned" row is a held-out one. What is tuned: BM25 k1/b
of the TEXT mode (unless --fusion-only), then each fusion of HYBRID
(backend.knowledge.fusion) over the same candidates (each question's hybrid candidates with
both signals, fused here by the service's own functions): `rrf` k and text weight by mean
nDCG@10, `score` text weight by a logistic fit (floor 0); the better fusion is "tuned". The
fit on all three sets is printed too: it is where the shipped defaults come from. `--tune
stdlib,debian` tunes on the sets named instead, for every set.

Needs the Redis at 127.0.0.1:6379 and an embedded PostgreSQL (or SIGHTLINE_DATABASE_URL).
Usage: python bench/retrieval_quality.py [--tune each] [--limit 400] [--fusion-only]
    [--skip-calibration]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import math
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from retrieval import knowledge_stack, stdlib_modules  # bench/ is sys.path[0] as a script
from sklearn.linear_model import LogisticRegression
from sqlalchemy import text

from backend.auth.principal import CredentialKind, Principal
from backend.auth.scopes import ALL_SCOPES
from backend.config import KnowledgeSettings
from backend.core.db import Database
from backend.core.models import Tenant, UserRole
from backend.knowledge.embeddings import LocalEmbedder
from backend.knowledge.fusion import fuse_ranks, fuse_scores
from backend.knowledge.service import KnowledgeService, SearchMode

PERLFAQ = Path("/usr/share/perl/5.36.0/pod")
_STOP_WORDS = (
    "a about above after again against all am an and any are as at be because been before being "
    "below between both but by can did do does doing down during each few for from further had "
    "has have having he her here hers herself him himself his how i if in into is it its itself "
    "just me more most my myself no nor not now of off on once only or other our ours ourselves "
    "out over own same she should so some such than that the their theirs them themselves then "
    "there these they this those through to too under until up very was we were what when where "
    "which while who whom why will with you your yours yourself yourselves"
)
STOP = frozenset(_STOP_WORDS.split())
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class LabelledSet:
    name: str
    passages: list[str]  # passage i is section "P{i}"
    queries: list[tuple[str, int]]  # (question, index of its passage)


def _clean_pod(body: str) -> str:
    body = re.sub(r"[A-Z]<<+\s(.*?)\s>>+", r"\1", body, flags=re.S)
    for _ in range(3):
        body = re.sub(r"[A-Z]<([^<>]*)>", r"\1", body)
    body = re.sub(r"^=\w+.*$", "", body, flags=re.M)
    return body.strip()


def perlfaq() -> LabelledSet:
    """The Perl FAQ's questions (=head2) with their answers."""
    passages, queries = [], []
    for path in sorted(PERLFAQ.glob("perlfaq[1-9].pod")):
        pod = path.read_text(encoding="utf-8", errors="replace")
        for part in re.split(r"^=head2 ", pod, flags=re.M)[1:]:
            question, _, body = part.partition("\n")
            body = re.split(r"^=head1 ", body, flags=re.M)[0]
            answer, question = _clean_pod(body), _clean_pod(question)
            if len(answer.split()) >= 20 and len(question.split()) >= 3:
                queries.append((question, len(passages)))
                passages.append(answer)
    if not passages:
        raise SystemExit(f"no perlfaq under {PERLFAQ}: apt-get install perl-doc")
    return LabelledSet("perlfaq", passages, queries)


def stdlib(limit: int, seed: int = 11) -> LabelledSet:
    """Summary line -> rest of the docstring, for documented stdlib functions and classes."""
    pairs: dict[str, str] = {}
    for module in stdlib_modules():
        for name, member in inspect.getmembers(module):
            if name.startswith("_") or not (inspect.isfunction(member) or inspect.isclass(member)):
                continue
            if getattr(member, "__module__", None) != module.__name__:
                continue  # documented where it is defined, once
            doc = inspect.getdoc(member) or ""
            summary, _, rest = doc.partition("\n")
            rest = rest.strip()
            if re.match(r"^[\w.]+\(", summary):
                continue  # a signature, not a sentence
            if len(summary.split()) >= 5 and len(rest.split()) >= 20 and summary not in pairs:
                pairs[summary] = rest
    return sampled("stdlib", pairs, limit, seed)


def debian(limit: int, seed: int = 11) -> LabelledSet:
    """Installed Debian packages: a package's one-line synopsis -> its long description
    (/var/lib/dpkg/status). Each synopsis and each description is taken once (a `-dev` package
    that repeats its library's description is dropped), so every question has one answer."""
    status = Path("/var/lib/dpkg/status")
    if not status.exists():
        raise SystemExit(f"no {status}: the debian set needs a Debian-based machine")
    pairs: dict[str, str] = {}
    descriptions: set[str] = set()
    stanza = re.compile(r"^Description: (.*)\n((?: .*(?:\n|$))*)", re.M)
    for entry in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        match = stanza.search(entry)
        if match is None:
            continue
        synopsis = match.group(1).strip()
        lines = [line.strip() for line in match.group(2).splitlines()]
        body = "\n".join("" if line == "." else line for line in lines).strip()
        if len(synopsis.split()) < 3 or len(body.split()) < 20:
            continue
        if synopsis in pairs or body in descriptions:
            continue
        pairs[synopsis] = body
        descriptions.add(body)
    return sampled("debian", pairs, limit, seed)


def sampled(name: str, pairs: dict[str, str], limit: int, seed: int) -> LabelledSet:
    """`limit` of the (question -> passage) pairs, drawn the same way on every run."""
    chosen = sorted(pairs.items())
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:limit]
    return LabelledSet(
        name, [passage for _, passage in chosen], [(q, i) for i, (q, _) in enumerate(chosen)]
    )


def markdown(passages: Sequence[str], start: int) -> str:
    """One section per passage; lines that Markdown would take for headings or fences are
    defused (the passage stays one section)."""
    parts = []
    for i, passage in enumerate(passages, start=start):
        body = re.sub(r"^(#+|```)", lambda m: " " * len(m.group(1)), passage, flags=re.M)
        parts.append(f"# P{i}\n\n{body}")
    return "\n\n".join(parts)


# -- metrics --------------------------------------------------------------------------------


def metrics(ranked: Sequence[Sequence[int]], answers: Sequence[int]) -> dict[str, float]:
    r1 = r10 = ndcg = mrr = 0.0
    for passages, answer in zip(ranked, answers, strict=True):
        if answer in passages:
            rank = list(passages).index(answer) + 1
            r1 += rank == 1
            r10 += rank <= 10
            ndcg += 1 / math.log2(rank + 1) if rank <= 10 else 0.0
            mrr += 1 / rank
    n = len(answers)
    return {"recall@1": r1 / n, "recall@10": r10 / n, "nDCG@10": ndcg / n, "MRR": mrr / n}


def passage_of(heading: str) -> int:
    """The passage a chunk belongs to, from its heading path (`P{i}` is the passage's
    section, see `markdown`)."""
    return int(heading.partition(" > ")[0][1:])


def passages_of(chunk_ids: Sequence[uuid.UUID], passage: dict[uuid.UUID, int]) -> list[int]:
    """A chunk ranking as a passage ranking (each passage at its best chunk's place)."""
    seen: dict[int, None] = {}
    for c in chunk_ids:
        seen.setdefault(passage[c], None)
    return list(seen)


# -- baselines ------------------------------------------------------------------------------


def tokens(body: str) -> list[str]:
    return [w for w in WORD.findall(body.lower()) if w not in STOP]


class PlainBM25:
    """Okapi BM25 over the chunks (Lucene's IDF), nothing shared with PostgreSQL."""

    def __init__(self, docs: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.tf = [Counter(tokens(d)) for d in docs]
        self.lengths = np.array([sum(t.values()) for t in self.tf], dtype=np.float64)
        self.avgdl = float(self.lengths.mean())
        df = Counter(w for t in self.tf for w in t)
        n = len(docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.postings: dict[str, list[int]] = {}
        for i, t in enumerate(self.tf):
            for w in t:
                self.postings.setdefault(w, []).append(i)
        self.k1, self.b = k1, b

    def rank(self, query: str) -> list[int]:
        scores: dict[int, float] = {}
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.avgdl)
        for w in set(tokens(query)):
            for i in self.postings.get(w, ()):
                f = self.tf[i][w]
                scores[i] = scores.get(i, 0.0) + self.idf[w] * f * (self.k1 + 1) / (f + norm[i])
        return sorted(scores, key=lambda i: -scores[i])


def rrf(rankings: Sequence[Sequence[int]], k: int = 60) -> list[int]:
    score: dict[int, float] = {}
    for ranking in rankings:
        for r, item in enumerate(ranking, start=1):
            score[item] = score.get(item, 0.0) + 1 / (k + r)
    return sorted(score, key=lambda i: -score[i])


# -- the run --------------------------------------------------------------------------------


@dataclass
class Loaded:
    labelled: LabelledSet
    principal: Principal
    chunk_ids: list[uuid.UUID]
    chunk_passage: dict[uuid.UUID, int]
    chunk_texts: list[str]
    vectors: np.ndarray  # chunk embeddings (normalised)
    query_vectors: np.ndarray
    ingest_s: float


def service_with(base: KnowledgeService, settings: KnowledgeSettings) -> KnowledgeService:
    """The same service (database, Redis, embedder, query cache) with other search settings."""
    other = KnowledgeService.__new__(KnowledgeService)
    other.__dict__.update(base.__dict__)
    other._settings = settings
    return other


async def ingest(service: KnowledgeService, principal: Principal, labelled: LabelledSet) -> None:
    """The set's passages through the real pipeline, one Markdown document (`{name}-{start}.md`)
    per 100, each job followed to its end."""
    per_doc = 100
    for start in range(0, len(labelled.passages), per_doc):
        body = markdown(labelled.passages[start : start + per_doc], start)
        job = await service.ingest(principal, body.encode(), filename=f"{labelled.name}-{start}.md")
        events = [e async for e in await service.job_events(principal, job.id, None)]
        if events[-1].type != "IngestionCompleted":
            raise SystemExit(f"ingestion failed: {events[-1].data}")


async def load(
    db: Database, service: KnowledgeService, embedder: LocalEmbedder, labelled: LabelledSet
) -> Loaded:
    async with db.session() as session:
        tenant = Tenant(slug=f"quality-{uuid.uuid4().hex[:6]}", name=labelled.name)
        session.add(tenant)
    principal = Principal(
        user_id=None,  # type: ignore[arg-type]
        tenant_id=tenant.id,
        role=UserRole.OWNER,
        scopes=ALL_SCOPES,
        credential=CredentialKind.API_KEY,
    )
    started = time.perf_counter()
    await ingest(service, principal, labelled)
    ingest_s = time.perf_counter() - started
    async with db.session(tenant.id) as session:
        rows = (
            await session.execute(
                text("SELECT id, heading, text, embedding::text AS v FROM chunks ORDER BY id")
            )
        ).all()
    ids = [r.id for r in rows]
    chunk_passage = {r.id: passage_of(r.heading) for r in rows}
    vectors = np.array([np.fromstring(r.v.strip("[]"), sep=",") for r in rows], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = [q for q, _ in labelled.queries]
    query_vectors = np.array([await service.query_vector(q) for q in queries], dtype=np.float32)
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    return Loaded(
        labelled,
        principal,
        ids,
        chunk_passage,
        [r.text for r in rows],
        vectors,
        query_vectors,
        ingest_s,
    )


async def sightline(
    service: KnowledgeService, data: Loaded, mode: SearchMode, k: int
) -> list[list[uuid.UUID]]:
    out = []
    for question, _ in data.labelled.queries:
        hits = await service.search(data.principal, question, k, mode=mode)
        out.append([h.chunk_id for h in hits])
    return out


async def candidates(
    service: KnowledgeService, data: Loaded, settings: KnowledgeSettings
) -> list[list[dict[str, object]]]:
    """Each question's hybrid candidates (both rankings' `candidates`), with both signals: what
    the service's fusion sees."""
    wide = service_with(service, settings.model_copy(update={"max_k": 2 * settings.candidates}))
    out = []
    for question, _ in data.labelled.queries:
        hits = await wide.search(data.principal, question, 2 * settings.candidates)
        out.append(
            [
                {
                    "id": h.chunk_id,
                    "vrank": h.vector_rank,
                    "trank": h.text_rank,
                    "vscore": h.vector_score,
                    "tscore": h.text_score,
                }
                for h in hits
            ]
        )
    return out


def fused_ranks(
    pools: Sequence[list[dict[str, object]]], rrf_k: int, wv: float, wt: float, k: int
) -> list[list[uuid.UUID]]:
    """What HYBRID returns with the `rrf` fusion (the service's own)."""
    weights = {"vrank": wv, "trank": wt}
    return [[r["id"] for r in fuse_ranks(p, rrf_k, k, weights=weights)] for p in pools]


def fused_scores(
    pools: Sequence[list[dict[str, object]]], weight: float, floor: float, k: int
) -> list[list[uuid.UUID]]:
    """What HYBRID returns with the `score` fusion (the service's own)."""
    return [[r["id"] for r in fuse_scores(p, k, text_weight=weight, floor=floor)] for p in pools]


def score(data: Loaded, chunk_rankings: Sequence[Sequence[uuid.UUID]]) -> dict[str, float]:
    ranked = [passages_of(r, data.chunk_passage) for r in chunk_rankings]
    return metrics(ranked, [a for _, a in data.labelled.queries])


def text_shares(pools: Sequence[list[dict[str, object]]]) -> list[list[dict[str, object]]]:
    """Each candidate of each pool (once per chunk) with the score fusion's two terms: `vscore`
    and `text`, margin x BM25 / best (the fusion's text term at weight 1, floor 0)."""
    out = []
    for pool in pools:
        fused = fuse_scores(pool, len(pool), text_weight=1.0, floor=0.0)
        out.append([r | {"text": float(r["score"]) - float(r["vscore"])} for r in fused])
    return out


def fit_text_weight(
    data: Sequence[Loaded], pools: Sequence[list[list[dict[str, object]]]]
) -> float:
    """The `score` fusion's text weight (floor 0) by logistic regression: is a candidate its
    question's answer, from its cosine similarity and its text term. The weight is the ratio of
    the two coefficients, the text term's worth in cosine similarity. A likelihood fit uses
    every candidate of every question; a grid search on nDCG@10 uses the first few, and its
    optimum is flat enough to follow one set's quirks (tuned on stdlib it picked a weight that
    lost to vector search on perlfaq)."""
    features, labels = [], []
    for loaded, set_pools in zip(data, pools, strict=True):
        for (_, answer), pool in zip(loaded.labelled.queries, text_shares(set_pools), strict=True):
            for r in pool:
                if r["vscore"] is None:
                    continue
                features.append((float(r["vscore"]), float(r["text"])))
                labels.append(loaded.chunk_passage[r["id"]] == answer)
    model = LogisticRegression(max_iter=3000, class_weight="balanced").fit(
        np.array(features), np.array(labels)
    )
    cosine, textual = model.coef_[0]
    return round(float(textual / cosine), 2)


class Pools:
    """Each set's hybrid candidates, by BM25 setting (one pass over a set's questions each)."""

    def __init__(self, service: KnowledgeService) -> None:
        self.service = service
        self.cache: dict[tuple[str, float, float], list[list[dict[str, object]]]] = {}

    async def of(self, data: Loaded, settings: KnowledgeSettings) -> list[list[dict[str, object]]]:
        key = (data.labelled.name, settings.bm25_k1, settings.bm25_b)
        if key not in self.cache:
            self.cache[key] = await candidates(self.service, data, settings)
        return self.cache[key]


async def tune(
    pools: Pools, data: Sequence[Loaded], base: KnowledgeSettings, *, bm25: bool = True
) -> tuple[KnowledgeSettings, KnowledgeSettings, list[str]]:
    """BM25 k1/b by mean TEXT nDCG@10 over the sets (unless `bm25` is False: the base's), then
    each fusion's parameters on the same sets: `rrf` k and text weight by mean HYBRID nDCG@10,
    `score` text weight by a logistic fit (floor 0). Returns the settings with the better
    fusion (mean HYBRID nDCG@10) and those with the other one."""
    service, n = pools.service, base.candidates
    notes, best = [], (-1.0, base.bm25_k1, base.bm25_b)

    def mean(rankings: Sequence[Sequence[Sequence[uuid.UUID]]]) -> float:
        return float(np.mean([score(d, r)["nDCG@10"] for d, r in zip(data, rankings, strict=True)]))

    grid = [(k1, b) for k1 in (0.6, 0.9, 1.2, 1.6, 2.0) for b in (0.3, 0.5, 0.75, 0.9)]
    for k1, b in grid if bm25 else [(base.bm25_k1, base.bm25_b)]:
        settings = base.model_copy(update={"bm25_k1": k1, "bm25_b": b})
        tuned = service_with(service, settings)
        best = max(
            best, (mean([await sightline(tuned, d, SearchMode.TEXT, n) for d in data]), k1, b)
        )
    notes.append(f"BM25 k1={best[1]} b={best[2]} (TEXT nDCG@10 {best[0]:.3f})")
    with_bm25 = base.model_copy(update={"bm25_k1": best[1], "bm25_b": best[2]})
    every = [await pools.of(d, with_bm25) for d in data]
    ranks = (-1.0, base.rrf_k, 1.0, 1.0)
    for rrf_k in (2, 5, 10, 20, 40, 60, 100):
        for wt in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
            value = mean([fused_ranks(p, rrf_k, 1.0, wt, 50) for p in every])
            ranks = max(ranks, (value, rrf_k, 1.0, wt))
    notes.append(
        f"rrf fusion: k={ranks[1]} weights vector {ranks[2]} text {ranks[3]} "
        f"(HYBRID nDCG@10 {ranks[0]:.3f})"
    )
    weight = fit_text_weight(data, every)
    by_score_value = mean([fused_scores(p, weight, 0.0, 50) for p in every])
    notes.append(
        f"score fusion: text weight {weight}, floor 0 (logistic fit; HYBRID nDCG@10 "
        f"{by_score_value:.3f})"
    )
    by_rank = with_bm25.model_copy(
        update={
            "fusion": "rrf",
            "rrf_k": ranks[1],
            "rrf_vector_weight": ranks[2],
            "rrf_text_weight": ranks[3],
        }
    )
    by_score = with_bm25.model_copy(
        update={"fusion": "score", "fusion_text_weight": weight, "fusion_text_floor": 0.0}
    )
    return (by_score, by_rank, notes) if by_score_value >= ranks[0] else (by_rank, by_score, notes)


async def report(
    service: KnowledgeService, data: Loaded, settings: dict[str, KnowledgeSettings]
) -> list[tuple[str, dict[str, float]]]:
    rows: list[tuple[str, dict[str, float]]] = []
    texts: set[tuple[float, float]] = set()
    for label, s in settings.items():
        tuned = service_with(service, s)
        for mode in (SearchMode.TEXT, SearchMode.VECTOR, SearchMode.HYBRID):
            if mode is SearchMode.VECTOR and rows and label != next(iter(settings)):
                continue  # vector search has no setting tuned here
            if mode is SearchMode.TEXT and (s.bm25_k1, s.bm25_b) in texts:
                continue  # the same BM25 as above
            texts.add((s.bm25_k1, s.bm25_b))
            run = await sightline(tuned, data, mode, 50)
            rows.append((f"Sightline {mode.name} ({label})", score(data, run)))
    plain = PlainBM25(data.chunk_texts)
    bm25 = [[data.chunk_ids[i] for i in plain.rank(q)] for q, _ in data.labelled.queries]
    exact = [
        [data.chunk_ids[i] for i in np.argsort(-(data.vectors @ qv))[:200]]
        for qv in data.query_vectors
    ]
    rows.append(("plain BM25 (k1 1.2, b 0.75)", score(data, bm25)))
    rows.append(("exact vector k-NN (cosine)", score(data, exact)))
    both = [[c for c in rrf([b[:100], e[:100]])] for b, e in zip(bm25, exact, strict=True)]
    rows.append(("RRF(plain BM25, exact vector), k 60", score(data, both)))
    return rows


SMALL_TALK = [
    "Hi, how are you today?",
    "What is 2 + 2?",
    "Thanks, that was helpful!",
    "Good morning!",
    "Can you tell me a joke?",
    "What's the weather like?",
    "Who are you?",
    "Hello there",
    "Nice to meet you.",
    "What time is it?",
    "Tell me something interesting.",
    "How was your weekend?",
    "Bye for now.",
    "What is the capital of France?",
    "Write me a haiku about autumn.",
    "Who won the football match yesterday?",
    "What should I cook for dinner tonight?",
    "I'm bored.",
    "Do you like music?",
    "Translate 'good night' into German.",
]


async def calibrate(
    service: KnowledgeService, loaded: dict[str, Loaded], tune_on: str
) -> tuple[float, list[str]]:
    """The relevance threshold for models without tool calling: the nearest chunk's cosine
    similarity for the set's own questions (in scope) against small talk and the other set's
    questions (out of scope); chosen on `tune_on`, checked on the other."""
    names = list(loaded)
    scores: dict[str, tuple[list[float], list[float]]] = {}
    for name in names:
        data = loaded[name]
        other = loaded[next(n for n in names if n != name)].labelled.queries[:100]
        inside = [await service.relevance(data.principal, q) for q, _ in data.labelled.queries]
        outside = [await service.relevance(data.principal, q) for q in SMALL_TALK]
        outside += [await service.relevance(data.principal, q) for q, _ in other]
        scores[name] = (inside, outside)

    def rates(name: str, threshold: float) -> tuple[float, float]:
        inside, outside = scores[name]
        kept = sum(v >= threshold for v in inside) / len(inside)
        dropped = sum(v < threshold for v in outside) / len(outside)
        return kept, dropped

    # The highest threshold that still retrieves for 95% of the questions the set covers: a
    # covered question that gets no sources costs more than small talk that gets some.
    candidates = [t / 100 for t in range(5, 80)]
    best = max(t for t in candidates if rates(tune_on, t)[0] >= 0.95)
    lines = []
    for name in names:
        inside, outside = scores[name]
        kept, dropped = rates(name, best)
        q = np.percentile
        lines.append(
            f"{name}: in-scope questions similarity p10/p50 {q(inside, 10):.2f}/"
            f"{q(inside, 50):.2f}, out-of-scope p50/p90 {q(outside, 50):.2f}/"
            f"{q(outside, 90):.2f}; at {best:.2f}: {kept:.1%} of questions retrieve, "
            f"{dropped:.1%} of small talk and other-domain questions do not "
            f"(small talk alone: {sum(v < best for v in outside[: len(SMALL_TALK)])}"
            f"/{len(SMALL_TALK)}, its highest {max(outside[: len(SMALL_TALK)]):.2f})"
        )
    return best, lines


def table(name: str, data: Loaded, rows: list[tuple[str, dict[str, float]]]) -> None:
    print(
        f"\n{name}: {len(data.labelled.passages)} passages ({len(data.chunk_ids)} chunks), "
        f"{len(data.labelled.queries)} questions; ingested in {data.ingest_s:.0f} s"
    )
    print(f"| {'ranking':44} | recall@1 | recall@10 | nDCG@10 |   MRR |")
    print(f"|{'-' * 46}|---------:|----------:|--------:|------:|")
    for label, m in rows:
        print(
            f"| {label:44} | {m['recall@1']:8.3f} | {m['recall@10']:9.3f} | "
            f"{m['nDCG@10']:7.3f} | {m['MRR']:5.3f} |"
        )


async def main(args: argparse.Namespace) -> None:
    defaults = KnowledgeSettings()
    async with knowledge_stack("quality", defaults) as (db, service, embedder):
        sets = {"perlfaq": perlfaq(), "stdlib": stdlib(args.limit), "debian": debian(args.limit)}
        loaded = {name: await load(db, service, embedder, s) for name, s in sets.items()}
        if not args.skip_calibration:
            threshold, lines = await calibrate(service, loaded, args.calibrate_on)
            print(
                f"relevance threshold (SIGHTLINE_KNOWLEDGE_MIN_RELEVANCE) {threshold:.2f}, "
                f"tuned on {args.calibrate_on}:"
            )
            for line in lines:
                print("  " + line)
        if args.calibrate_only:
            return
        base = defaults.model_copy(
            update={"fusion": "rrf", "rrf_k": 60, "rrf_vector_weight": 1.0, "rrf_text_weight": 1.0}
            | ({} if args.fusion_only else {"bm25_k1": 1.2, "bm25_b": 0.75})
        )
        pools = Pools(service)
        if args.tune == "each":  # leave one set out: each set is scored with what the others chose
            folds = {name: [n for n in loaded if n != name] for name in loaded}
        else:
            chosen = args.tune.split(",")
            folds = {name: chosen for name in loaded}
        print(f"retrieval quality: MiniLM-L6 (384-d), {os.cpu_count()} CPUs")
        fits: dict[tuple[str, ...], tuple[KnowledgeSettings, KnowledgeSettings]] = {}
        every_fit = dict.fromkeys([*sorted({tuple(f) for f in folds.values()}), tuple(loaded)])
        for on in every_fit:
            tuned, other, notes = await tune(
                pools, [loaded[n] for n in on], base, bm25=not args.fusion_only
            )
            fits[on] = (tuned, other)
            print(f"tuned on {', '.join(on)}:")
            for note in notes:
                print("  " + note)
        for name, data in loaded.items():
            on = tuple(folds[name])
            tuned, other = fits[on]
            role = "a tuning set" if name in on else f"held out, tuned on {', '.join(on)}"
            compared = {
                "defaults": defaults,
                f"tuned, {tuned.fusion}": tuned,
                f"tuned, {other.fusion}": other,
            }
            table(f"{name} ({role})", data, await report(service, data, compared))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tune",
        default="each",
        help="`each` (every set scored with the fusion tuned on the other sets) or the sets to "
        "tune on, comma-separated (perlfaq, stdlib, debian)",
    )
    parser.add_argument("--limit", type=int, default=400, help="stdlib and debian questions")
    parser.add_argument("--calibrate-on", choices=("perlfaq", "stdlib", "debian"), default="stdlib")
    parser.add_argument(
        "--calibrate-only", action="store_true", help="the relevance threshold only"
    )
    parser.add_argument(
        "--skip-calibration", action="store_true", help="no relevance threshold (saves time)"
    )
    parser.add_argument(
        "--fusion-only",
        action="store_true",
        help="tune the fusion only, with the configured BM25 k1/b (saves 20 TEXT runs a fit)",
    )
    asyncio.run(main(parser.parse_args()))
