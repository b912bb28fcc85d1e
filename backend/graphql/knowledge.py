"""The knowledge base in the schema: documents, ingestion (multipart upload or text), progress
subscriptions and hybrid search."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from datetime import datetime
from typing import Annotated, Any

import strawberry
from strawberry.file_uploads import Upload
from strawberry.scalars import JSON
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.core import models
from backend.errors import ValidationFailed
from backend.graphql.chat import Edge, PageInfo
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import HasScope, until_credential_ends
from backend.graphql.uploads import read_upload
from backend.knowledge.service import SearchHit
from backend.knowledge.service import SearchMode as Mode
from backend.realtime.eventlog import RunEvent as LoggedEvent

READ = [HasScope(Scope.KNOWLEDGE_READ)]
WRITE = [HasScope(Scope.KNOWLEDGE_WRITE)]

SearchMode = strawberry.enum(Mode, name="SearchMode")
JobStatus = strawberry.enum(models.JobStatus, name="IngestionStatus")


@strawberry.type(name="Document")
class DocumentType:
    id: strawberry.ID
    source: str
    title: str
    media_type: str
    content_hash: str
    size_bytes: int
    chunk_count: int
    embedding_model: str
    metadata: JSON
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, d: models.Document) -> DocumentType:
        return cls(
            id=strawberry.ID(str(d.id)),
            source=d.source,
            title=d.title,
            media_type=d.media_type,
            content_hash=d.content_hash,
            size_bytes=d.size_bytes,
            chunk_count=d.chunk_count,
            embedding_model=d.embedding_model,
            metadata=d.meta,
            created_at=d.created_at,
            updated_at=d.updated_at,
        )


@strawberry.type
class DocumentConnection:
    edges: list[Edge[DocumentType]]
    page_info: PageInfo


@strawberry.type(name="Chunk", description="A passage of a document, where a citation points.")
class ChunkType:
    id: strawberry.ID
    document_id: strawberry.ID
    ord: int
    text: str
    heading: str
    page: int | None
    char_start: int
    char_end: int

    @classmethod
    def of(cls, c: models.Chunk) -> ChunkType:
        return cls(
            id=strawberry.ID(str(c.id)),
            document_id=strawberry.ID(str(c.document_id)),
            ord=c.ord,
            text=c.text,
            heading=c.heading,
            page=c.page,
            char_start=c.char_start,
            char_end=c.char_end,
        )


@strawberry.type
class SearchResult:
    chunk_id: strawberry.ID
    document_id: strawberry.ID
    document_title: str
    source: str
    text: str
    heading: str
    page: int | None
    char_start: int
    char_end: int
    score: float = strawberry.field(
        description="Fused score (`SIGHTLINE_KNOWLEDGE_FUSION`), or cosine when rescored."
    )
    vector_rank: int | None
    text_rank: int | None

    @classmethod
    def of(cls, h: SearchHit) -> SearchResult:
        return cls(
            chunk_id=strawberry.ID(str(h.chunk_id)),
            document_id=strawberry.ID(str(h.document_id)),
            document_title=h.document_title,
            source=h.source,
            text=h.text,
            heading=h.heading,
            page=h.page,
            char_start=h.char_start,
            char_end=h.char_end,
            score=h.score,
            vector_rank=h.vector_rank,
            text_rank=h.text_rank,
        )


@strawberry.type(name="IngestionJob")
class IngestionJobType:
    id: strawberry.ID
    source: str
    status: JobStatus  # type: ignore[valid-type]
    document_id: strawberry.ID | None
    total: int
    done: int
    error_code: str | None
    error: str | None
    created_at: datetime

    @classmethod
    def of(cls, j: models.IngestionJob) -> IngestionJobType:
        return cls(
            id=strawberry.ID(str(j.id)),
            source=j.source,
            status=models.JobStatus(j.status),
            document_id=strawberry.ID(str(j.document_id)) if j.document_id else None,
            total=j.total,
            done=j.done,
            error_code=j.error_code,
            error=j.error,
            created_at=j.created_at,
        )


@strawberry.interface(description="An event of an ingestion job; `cursor` resumes after it.")
class IngestionEvent:
    cursor: str


@strawberry.type
class IngestionQueued(IngestionEvent):
    source: str


@strawberry.type(
    description="`status` running, reading (OCR), retrying (the embedder is down; it waits), "
    "or resumed (its server stopped: another one starts the job again)."
)
class IngestionProgress(IngestionEvent):
    status: str
    done: int
    total: int
    retry_in_s: float | None
    reason: str | None


@strawberry.type(description="`status` completed, or unchanged (same content already stored).")
class IngestionCompleted(IngestionEvent):
    status: str
    document_id: strawberry.ID
    chunks: int


@strawberry.type
class IngestionFailed(IngestionEvent):
    code: str
    message: str


INGESTION_EVENT_TYPES = (IngestionQueued, IngestionProgress, IngestionCompleted, IngestionFailed)

_EVENTS: dict[str, Callable[[str, dict[str, Any]], IngestionEvent]] = {
    "IngestionQueued": lambda c, d: IngestionQueued(cursor=c, source=str(d.get("source", ""))),
    "IngestionProgress": lambda c, d: IngestionProgress(
        cursor=c,
        status=str(d.get("status", "running")),
        done=int(d.get("done", 0)),
        total=int(d.get("total", 0)),
        retry_in_s=d.get("retryInS"),
        reason=d.get("reason"),
    ),
    "IngestionCompleted": lambda c, d: IngestionCompleted(
        cursor=c,
        status=str(d["status"]),
        document_id=strawberry.ID(str(d["documentId"])),
        chunks=int(d.get("total", 0)),
    ),
}


def _event(event: LoggedEvent) -> IngestionEvent:
    build = _EVENTS.get(event.type)
    if build is not None:
        return build(event.cursor, event.data)
    return IngestionFailed(
        cursor=event.cursor,
        code=str(event.data.get("code", "INTERNAL_SERVER_ERROR")),
        message=str(event.data.get("message", "")),
    )


@strawberry.type
class KnowledgeQuery:
    @strawberry.field(permission_classes=READ, description="The tenant's documents, newest first.")
    async def documents(
        self, info: Info[Context, None], first: int = 20, after: str | None = None
    ) -> DocumentConnection:
        page = await info.context.services.knowledge.documents(
            info.context.require_principal(), first, after
        )
        return DocumentConnection(
            edges=[
                Edge(node=DocumentType.of(d), cursor=c)
                for d, c in zip(page.items, page.cursors, strict=True)
            ],
            page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.end_cursor),
        )

    @strawberry.field(permission_classes=READ)
    async def document(self, info: Info[Context, None], id: strawberry.ID) -> DocumentType:
        document = await info.context.services.knowledge.document(
            info.context.require_principal(), parse_id(id, "id")
        )
        return DocumentType.of(document)

    @strawberry.field(permission_classes=READ, description="One passage (what a citation opens).")
    async def chunk(self, info: Info[Context, None], id: strawberry.ID) -> ChunkType:
        row = await info.context.services.knowledge.chunk(
            info.context.require_principal(), parse_id(id, "id")
        )
        return ChunkType.of(row)

    @strawberry.field(permission_classes=READ)
    async def ingestion_job(self, info: Info[Context, None], id: strawberry.ID) -> IngestionJobType:
        job = await info.context.services.knowledge.job(
            info.context.require_principal(), parse_id(id, "id")
        )
        return IngestionJobType.of(job)

    @strawberry.field(
        permission_classes=READ,
        description="Hybrid search: vector (HNSW) and full-text rankings fused by reciprocal "
        "rank. `filter` matches document metadata (JSON containment).",
    )
    async def search(
        self,
        info: Info[Context, None],
        *,
        query: str,
        k: int = 5,
        mode: SearchMode = Mode.HYBRID,  # type: ignore[valid-type]
        filter: JSON | None = None,
        document_ids: list[strawberry.ID] | None = None,
        ef_search: int | None = None,
        rescore: Annotated[
            bool,
            strawberry.argument(description="Re-rank candidates by exact cosine similarity."),
        ] = False,
    ) -> list[SearchResult]:
        if filter is not None and not isinstance(filter, dict):
            raise ValidationFailed("filter must be a JSON object", field="filter")
        hits = await info.context.services.knowledge.search(
            info.context.require_principal(),
            query,
            k,
            mode=mode,
            metadata=filter,
            document_ids=[parse_id(d, "documentIds") for d in document_ids or []] or None,
            ef_search=ef_search,
            rescore=rescore,
        )
        return [SearchResult.of(h) for h in hits]


@strawberry.type
class KnowledgeMutation:
    @strawberry.mutation(
        permission_classes=WRITE,
        description="Ingests a file (multipart upload) or `text`; follow ingestionJobEvents(id). "
        "The same `source` again replaces the document (nothing happens if unchanged).",
    )
    async def ingest_document(
        self,
        info: Info[Context, None],
        *,
        file: Upload | None = None,
        text: str | None = None,
        # `source` (the API's name) would clash with Strawberry's resolver arguments
        document_source: Annotated[
            str | None,
            strawberry.argument(name="source", description="Key of the document (file name)."),
        ] = None,
        title: str | None = None,
        metadata: JSON | None = None,
    ) -> IngestionJobType:
        if (file is None) == (text is None):
            raise ValidationFailed("give exactly one of file and text", field="file")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValidationFailed("metadata must be a JSON object", field="metadata")
        limit = info.context.state.settings.knowledge.max_document_bytes
        if file is not None:
            data = await read_upload(file, limit + 1)
            filename = str(getattr(file, "filename", "") or "")
        else:
            data = (text or "").encode()
            filename = ""
        job = await info.context.services.knowledge.ingest(
            info.context.require_principal(),
            data,
            filename=filename,
            source=document_source,
            title=title,
            meta=metadata,
        )
        return IngestionJobType.of(job)

    @strawberry.mutation(
        permission_classes=WRITE,
        description="Re-embeds documents embedded by an earlier model (search leaves them out "
        "until then); returns how many were updated.",
    )
    async def reembed_documents(self, info: Info[Context, None]) -> int:
        return await info.context.services.knowledge.reembed_stale(info.context.require_principal())

    @strawberry.mutation(permission_classes=WRITE, description="Deletes a document and its chunks.")
    async def delete_document(self, info: Info[Context, None], id: strawberry.ID) -> bool:
        await info.context.services.knowledge.delete(
            info.context.require_principal(), parse_id(id, "id")
        )
        return True


@strawberry.type
class KnowledgeSubscription:
    @strawberry.subscription(
        permission_classes=READ,
        description="A job's progress from after `after` (from the start when null), then live.",
    )
    async def ingestion_job_events(
        self, info: Info[Context, None], id: strawberry.ID, after: str | None = None
    ) -> AsyncGenerator[IngestionEvent, None]:
        events = await info.context.services.knowledge.job_events(
            info.context.require_principal(), parse_id(id, "id"), after
        )
        return _relay(info, events)


async def _relay(
    info: Info[Context, None], events: AsyncGenerator[LoggedEvent, None]
) -> AsyncGenerator[IngestionEvent, None]:
    async for event in until_credential_ends(info.context, events):
        yield _event(event)


__all__ = ["INGESTION_EVENT_TYPES", "KnowledgeMutation", "KnowledgeQuery", "KnowledgeSubscription"]
