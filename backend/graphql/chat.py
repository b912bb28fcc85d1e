"""Conversations and messages in the schema (Relay-style connections)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

import strawberry
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.core import models
from backend.core.pagination import Page
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import HasScope

MessageRole = strawberry.enum(models.MessageRole, name="MessageRole")
N = TypeVar("N")


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class Edge(Generic[N]):
    node: N
    cursor: str


@strawberry.type(
    name="Source", description="A passage the answer was given to draw on, numbered as [n]."
)
class SourceType:
    index: int = strawberry.field(description="Its number n: the answer cites it as [n].")
    chunk_id: strawberry.ID
    document_id: strawberry.ID
    title: str
    text: str
    score: float = strawberry.field(description="Its search score when it was retrieved.")
    heading: str | None
    page: int | None
    char_start: int | None
    char_end: int | None

    @classmethod
    def of(cls, s: dict[str, Any]) -> SourceType:
        span = s.get("span") or {}
        return cls(
            index=int(s["n"]),
            chunk_id=strawberry.ID(str(s["chunk_id"])),
            document_id=strawberry.ID(str(s["document_id"])),
            title=str(s.get("title", "")),
            text=str(s.get("text", "")),
            score=float(s.get("score") or 0.0),
            heading=span.get("heading"),
            page=span.get("page"),
            char_start=span.get("charStart"),
            char_end=span.get("charEnd"),
        )


def citation_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A citation as stored and as CitationAdded carries it (events from before confidence
    was added were all `[n]` markers: explicit, confidence 1)."""
    span = d.get("span") or {}
    return {
        "index": int(d["index"]),
        "chunk_id": strawberry.ID(str(d["chunkId"])),
        "document_id": strawberry.ID(str(d["documentId"])),
        "title": str(d.get("title", "")),
        "answer_start": int(d["answerStart"]),
        "answer_end": int(d["answerEnd"]),
        "page": span.get("page"),
        "char_start": span.get("charStart"),
        "char_end": span.get("charEnd"),
        "confidence": float(d.get("confidence", 1.0)),
        "explicit": bool(d.get("explicit", True)),
    }


CONFIDENCE = (
    "1 for a `[n]` the model wrote; for a sentence attributed by similarity (the model cited "
    "nothing), its cosine similarity to the source."
)
EXPLICIT = (
    "True: the model wrote `[n]` (answerStart/answerEnd: the marker). False: attributed by "
    "similarity (answerStart/answerEnd: the sentence)."
)


@strawberry.type(
    name="Citation",
    description="Where the answer draws on a source: the `[n]` the model wrote, or a sentence "
    "attributed to the source by similarity. Offsets are characters of the message's content.",
)
class CitationType:
    index: int = strawberry.field(description="The source's number (Message.sources).")
    chunk_id: strawberry.ID
    document_id: strawberry.ID
    title: str
    answer_start: int
    answer_end: int
    page: int | None
    char_start: int | None
    char_end: int | None
    confidence: float = strawberry.field(description=CONFIDENCE)
    explicit: bool = strawberry.field(description=EXPLICIT)


@strawberry.type(description="The model that wrote an answer: its alias, name and version.")
class ServedModel:
    alias: str | None
    name: str | None
    version: str | None

    @classmethod
    def of(cls, served: object) -> ServedModel | None:
        if not isinstance(served, dict):
            return None
        return cls(
            alias=served.get("alias"), name=served.get("name"), version=served.get("version")
        )


@strawberry.type(name="Message")
class MessageType:
    id: strawberry.ID
    role: MessageRole  # type: ignore[valid-type]
    content: str
    complete: bool = strawberry.field(description="False when generation stopped early.")
    run_id: strawberry.ID | None
    created_at: datetime
    attachments: list[strawberry.ID] = strawberry.field(
        description="The vision jobs of the images the message attached (sendMessage)."
    )
    sources: list[SourceType] = strawberry.field(
        description="An answer's: the knowledge-base passages it was given, as numbered then."
    )
    citations: list[CitationType] = strawberry.field(
        description="An answer's citations of its sources, as the run's CitationAdded events "
        "reported them, in the order they came."
    )
    model: ServedModel | None = strawberry.field(
        description="An answer's: the model version that wrote it (null: a user's message, "
        "or an answer from before versions were recorded)."
    )

    @classmethod
    def of(cls, m: models.Message) -> MessageType:
        # stored with the message (meta), so a page of messages costs no further query
        meta = m.meta or {}
        return cls(
            id=strawberry.ID(str(m.id)),
            role=m.role,
            content=m.content,
            complete=m.complete,
            run_id=strawberry.ID(str(m.run_id)) if m.run_id else None,
            created_at=m.created_at,
            attachments=[strawberry.ID(str(a)) for a in meta.get("attachments", ())],
            sources=[SourceType.of(s) for s in meta.get("sources", ())],
            citations=[CitationType(**citation_fields(c)) for c in meta.get("citations", ())],
            model=ServedModel.of(meta.get("model")),
        )


@strawberry.type
class MessageConnection:
    edges: list[Edge[MessageType]]
    page_info: PageInfo


@strawberry.type(name="Conversation")
class ConversationType:
    id: strawberry.ID
    title: str
    archived: bool
    created_at: datetime
    updated_at: datetime

    @strawberry.field
    async def messages(
        self, info: Info[Context, None], first: int = 50, after: str | None = None
    ) -> MessageConnection:
        page = await info.context.services.conversations.messages(
            info.context.require_principal(), parse_id(self.id, "id"), first, after
        )
        return MessageConnection(
            edges=[
                Edge(node=MessageType.of(m), cursor=c)
                for m, c in zip(page.items, page.cursors, strict=True)
            ],
            page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.end_cursor),
        )

    @classmethod
    def of(cls, c: models.Conversation) -> ConversationType:
        return cls(
            id=strawberry.ID(str(c.id)),
            title=c.title,
            archived=c.archived_at is not None,
            created_at=c.created_at,
            updated_at=c.updated_at,
        )


@strawberry.type
class ConversationConnection:
    edges: list[Edge[ConversationType]]
    page_info: PageInfo


def _connection(page: Page[models.Conversation]) -> ConversationConnection:
    return ConversationConnection(
        edges=[
            Edge(node=ConversationType.of(c), cursor=cursor)
            for c, cursor in zip(page.items, page.cursors, strict=True)
        ],
        page_info=PageInfo(has_next_page=page.has_next, end_cursor=page.end_cursor),
    )


CHAT = [HasScope(Scope.CHAT)]


@strawberry.type
class ChatQuery:
    @strawberry.field(
        permission_classes=CHAT, description="The caller's conversations, newest first."
    )
    async def conversations(
        self,
        info: Info[Context, None],
        first: int = 20,
        after: str | None = None,
        archived: bool = False,
    ) -> ConversationConnection:
        page = await info.context.services.conversations.list(
            info.context.require_principal(), first, after, archived
        )
        return _connection(page)

    @strawberry.field(permission_classes=CHAT)
    async def conversation(self, info: Info[Context, None], id: strawberry.ID) -> ConversationType:
        conversation = await info.context.services.conversations.get(
            info.context.require_principal(), parse_id(id, "id")
        )
        return ConversationType.of(conversation)


@strawberry.type
class ChatMutation:
    @strawberry.mutation(permission_classes=CHAT)
    async def create_conversation(
        self, info: Info[Context, None], title: str = ""
    ) -> ConversationType:
        conversation = await info.context.services.conversations.create(
            info.context.require_principal(), title
        )
        return ConversationType.of(conversation)

    @strawberry.mutation(permission_classes=CHAT)
    async def rename_conversation(
        self, info: Info[Context, None], id: strawberry.ID, title: str
    ) -> ConversationType:
        conversation = await info.context.services.conversations.rename(
            info.context.require_principal(), parse_id(id, "id"), title
        )
        return ConversationType.of(conversation)

    @strawberry.mutation(permission_classes=CHAT)
    async def archive_conversation(
        self, info: Info[Context, None], id: strawberry.ID, archived: bool = True
    ) -> ConversationType:
        conversation = await info.context.services.conversations.archive(
            info.context.require_principal(), parse_id(id, "id"), archived
        )
        return ConversationType.of(conversation)

    @strawberry.mutation(permission_classes=CHAT)
    async def delete_conversation(self, info: Info[Context, None], id: strawberry.ID) -> bool:
        conversation_id = parse_id(id, "id")
        services = info.context.services
        principal = info.context.require_principal()
        await services.runs.stop_conversation(principal, conversation_id)
        await services.conversations.delete(principal, conversation_id)
        await services.runs.agent.forget(conversation_id)  # its memory goes with it
        return True
