"""Chat runs in the schema: sendMessage, cancelRun and the resumable runEvents subscription."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, Callable
from datetime import datetime
from enum import Enum
from typing import Annotated

import strawberry
from strawberry.types import Info

from backend.agents import runs
from backend.core import models
from backend.graphql.chat import CHAT, CitationType, MessageType, citation_fields
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import until_credential_ends
from backend.realtime.eventlog import RunEvent as LoggedEvent


@strawberry.enum(name="RunStatus")
class RunStatus(Enum):
    """A run's status as stored (models.RunStatus), and CANCELLING, which only cancelRun
    answers: the run is not stored as cancelling, it is still running until it stops."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CANCELLING = strawberry.enum_value(
        "cancelling",
        description="Only from cancelRun: asked to stop, not ended yet. The run's last event "
        "(RunCancelled, or RunCompleted/RunFailed when it ended first) says how it ended.",
    )


OnBusy = strawberry.enum(
    runs.OnBusy,
    name="OnBusy",
    description="Double texting: REJECT (RUN_IN_PROGRESS; the message is not stored), "
    "INTERRUPT the running turn, or ENQUEUE after it.",
)


@strawberry.type
class ChatRun:
    id: strawberry.ID
    conversation_id: strawberry.ID
    status: RunStatus  # type: ignore[valid-type]
    model: str = strawberry.field(description="The name the model's endpoint knows it by.")
    model_alias: str | None = strawberry.field(
        description="The alias the run was served by (null: a run from before versions)."
    )
    model_version: str | None = strawberry.field(
        description="The version of the alias that served the run (`alias@version` pins it)."
    )
    error_code: str | None
    created_at: datetime

    @classmethod
    def of(cls, run: models.Run, *, stopping: bool = False) -> ChatRun:
        return cls(
            id=strawberry.ID(str(run.id)),
            conversation_id=strawberry.ID(str(run.conversation_id)),
            status=RunStatus.CANCELLING if stopping else RunStatus(run.status.value),
            model=run.model,
            model_alias=run.model_alias,
            model_version=run.model_version,
            error_code=run.error_code,
            created_at=run.created_at,
        )


@strawberry.type
class SentMessage:
    run: ChatRun
    message: MessageType


@strawberry.type
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cost: float


@strawberry.interface(description="An event of a run; `cursor` resumes the stream after it.")
class RunEvent:
    cursor: str


@strawberry.type
class RunStarted(RunEvent):
    run_id: strawberry.ID = strawberry.field(
        description="The run: for cancelRun, or runEvents(after:) to resume on a new connection."
    )
    conversation_id: strawberry.ID
    model: str
    model_alias: str | None = strawberry.field(description="The alias serving the run.")
    model_version: str | None = strawberry.field(
        description="The version of the alias serving the run."
    )


@strawberry.type
class TokenDelta(RunEvent):
    text: str
    index: int = strawberry.field(description="Index of the last token in `text`.")


@strawberry.type
class RunCompleted(RunEvent):
    message_id: strawberry.ID | None
    usage: Usage
    latency_ms: float


@strawberry.type
class RunFailed(RunEvent):
    code: str
    message: str
    message_id: strawberry.ID | None


@strawberry.type
class RunCancelled(RunEvent):
    message_id: strawberry.ID | None


@strawberry.type(description="The agent called a tool (`arguments` as JSON).")
class ToolCallStarted(RunEvent):
    call_id: str
    name: str
    arguments: str


@strawberry.type
class ToolCallFinished(RunEvent):
    call_id: str
    name: str
    ok: bool
    result_count: int = strawberry.field(description="Sources known to the turn so far.")


@strawberry.type(
    description="The answer cited a source: `answerStart`/`answerEnd` are character offsets "
    "of the `[n]` marker in the answer, or of the sentence attributed to the source when the "
    "model wrote no marker (`explicit` false, after the answer's last token); the chunk and "
    "its span in the document are linked."
)
class CitationAdded(RunEvent, CitationType):
    pass


@strawberry.type(
    description="A rail acted: `stage` input, retrieval or output; `action` block, redact or warn."
)
class GuardrailTriggered(RunEvent):
    stage: str
    rail: str
    action: str
    reason: str


# Listed for the schema: they are only reachable through the RunEvent interface.
RUN_EVENT_TYPES = (
    RunStarted,
    TokenDelta,
    ToolCallStarted,
    ToolCallFinished,
    CitationAdded,
    GuardrailTriggered,
    RunCompleted,
    RunFailed,
    RunCancelled,
)


@strawberry.type(description="A model alias `sendMessage(model:)` accepts, with its prices.")
class ChatModelInfo:
    alias: str
    name: str
    version: str = strawberry.field(description="The version serving when none is pinned.")
    versions: list[str] = strawberry.field(
        description='The versions loaded: `sendMessage(model: "alias@version")` pins one.'
    )
    context_tokens: int
    prompt_price_per_1k: float
    completion_price_per_1k: float
    supports_tools: bool


def _usage(data: dict) -> Usage:
    usage = data.get("usage") or {}
    return Usage(
        prompt_tokens=int(usage.get("promptTokens", 0)),
        completion_tokens=int(usage.get("completionTokens", 0)),
        cost=float(usage.get("cost", 0.0)),
    )


def _message_id(data: dict) -> strawberry.ID | None:
    return strawberry.ID(data["messageId"]) if data.get("messageId") else None


_BUILDERS: dict[str, Callable[[str, dict], RunEvent]] = {
    "TokenDelta": lambda c, d: TokenDelta(cursor=c, text=d["text"], index=int(d["index"])),
    "RunCompleted": lambda c, d: RunCompleted(
        cursor=c,
        message_id=_message_id(d),
        usage=_usage(d),
        latency_ms=float(d.get("latencyMs", 0)),
    ),
    "RunCancelled": lambda c, d: RunCancelled(cursor=c, message_id=_message_id(d)),
    "ToolCallStarted": lambda c, d: ToolCallStarted(
        cursor=c,
        call_id=str(d["callId"]),
        name=str(d["name"]),
        arguments=json.dumps(d.get("arguments") or {}),
    ),
    "ToolCallFinished": lambda c, d: ToolCallFinished(
        cursor=c,
        call_id=str(d["callId"]),
        name=str(d["name"]),
        ok=bool(d.get("ok")),
        result_count=int(d.get("resultCount", 0)),
    ),
    "CitationAdded": lambda c, d: CitationAdded(cursor=c, **citation_fields(d)),
    "GuardrailTriggered": lambda c, d: GuardrailTriggered(
        cursor=c,
        stage=str(d["stage"]),
        rail=str(d["rail"]),
        action=str(d["action"]),
        reason=str(d.get("reason", "")),
    ),
}


def _event(event: LoggedEvent, run_id: uuid.UUID) -> RunEvent:
    if event.type == "RunStarted":
        return RunStarted(
            cursor=event.cursor,
            run_id=strawberry.ID(str(run_id)),
            conversation_id=strawberry.ID(str(event.data.get("conversationId", ""))),
            model=str(event.data.get("model", "")),
            model_alias=event.data.get("modelAlias"),
            model_version=event.data.get("modelVersion"),
        )
    build = _BUILDERS.get(event.type)
    if build is not None:
        return build(event.cursor, event.data)
    return RunFailed(
        cursor=event.cursor,
        code=str(event.data.get("code", "INTERNAL_SERVER_ERROR")),
        message=str(event.data.get("message", "")),
        message_id=_message_id(event.data),
    )


@strawberry.type
class RunMutation:
    @strawberry.mutation(
        permission_classes=CHAT,
        description="Starts a turn and stores the message; subscribe to runEvents(runId) for "
        "the answer. With onBusy REJECT, a message sent while a turn is going is refused "
        "(RUN_IN_PROGRESS) and not stored: send it again once the turn has ended.",
    )
    async def send_message(
        self,
        info: Info[Context, None],
        *,
        conversation_id: strawberry.ID,
        content: str,
        on_busy: OnBusy = runs.OnBusy.REJECT,  # type: ignore[valid-type]
        model: Annotated[
            str | None,
            strawberry.argument(
                description="A model alias (see chatModels), or `alias@version` for exactly "
                "that version (BAD_USER_INPUT naming the loaded versions when it is not one); "
                "null: `default`."
            ),
        ] = None,
        attachments: Annotated[
            list[strawberry.ID] | None,
            strawberry.argument(
                description="Images for the answer to look at: ids of the caller's completed "
                "vision jobs (analyzeImage)."
            ),
        ] = None,
    ) -> SentMessage:
        started = await _start_turn(info, conversation_id, content, on_busy, model, attachments)
        return SentMessage(
            run=ChatRun.of(started.run), message=MessageType.of(started.user_message)
        )

    @strawberry.mutation(
        permission_classes=CHAT,
        description="Stops a run and its model call (on whichever replica). Waits briefly "
        "(SIGHTLINE_CHAT_CANCEL_WAIT_S) for the run to end and returns its final status: "
        "CANCELLED, or COMPLETED/FAILED when it ended first; CANCELLING when it has not ended "
        "yet (its last event then says how it ended). Never QUEUED or RUNNING.",
    )
    async def cancel_run(self, info: Info[Context, None], run_id: strawberry.ID) -> ChatRun:
        cancelled = await info.context.services.runs.cancel(
            info.context.require_principal(), parse_id(run_id, "runId")
        )
        return ChatRun.of(cancelled.run, stopping=cancelled.stopping)


@strawberry.type
class RunQuery:
    @strawberry.field(permission_classes=CHAT, description="The model aliases of this server.")
    def chat_models(self, info: Info[Context, None]) -> list[ChatModelInfo]:
        registry = info.context.services.runs.models
        return [
            ChatModelInfo(
                alias=m.alias,
                name=m.name,
                version=m.version,
                versions=[v.version for v in registry.versions(m.alias)],
                context_tokens=m.context_tokens,
                prompt_price_per_1k=float(m.prompt_price_per_1k),
                completion_price_per_1k=float(m.completion_price_per_1k),
                supports_tools=m.provider.supports_tools,
            )
            for m in registry.aliases
        ]

    @strawberry.field(permission_classes=CHAT)
    async def run(self, info: Info[Context, None], id: strawberry.ID) -> ChatRun:
        run = await info.context.services.runs.get(
            info.context.require_principal(), parse_id(id, "id")
        )
        return ChatRun.of(run)


@strawberry.type
class RunSubscription:
    @strawberry.subscription(
        permission_classes=CHAT,
        description="A run's events from after `after` (from the start when null), then live. "
        "A disconnect does not stop the run unless `cancelOnDisconnect`.",
    )
    async def run_events(
        self,
        info: Info[Context, None],
        run_id: strawberry.ID,
        after: str | None = None,
        cancel_on_disconnect: bool = False,
    ) -> AsyncGenerator[RunEvent, None]:
        principal = info.context.require_principal()
        run_uuid = parse_id(run_id, "runId")
        events = await info.context.services.runs.stream(principal, run_uuid, after)
        return _relay(info, principal, run_uuid, events, cancel_on_disconnect)

    @strawberry.subscription(
        permission_classes=CHAT,
        description="sendMessage and runEvents in one operation: starts a turn (the same "
        "arguments, checks and errors as sendMessage) and streams its events, from RunStarted "
        "(which names the run, for cancelRun or runEvents(after:) on a new connection) to the "
        "run's end. On a socket the client keeps, the answer starts a round trip sooner. A "
        "disconnect does not stop the run unless `cancelOnDisconnect`.",
    )
    async def chat(
        self,
        info: Info[Context, None],
        *,
        conversation_id: strawberry.ID,
        content: str,
        on_busy: OnBusy = runs.OnBusy.REJECT,  # type: ignore[valid-type]
        model: Annotated[
            str | None,
            strawberry.argument(description="As sendMessage's `model`."),
        ] = None,
        attachments: Annotated[
            list[strawberry.ID] | None,
            strawberry.argument(description="As sendMessage's `attachments`."),
        ] = None,
        cancel_on_disconnect: bool = False,
    ) -> AsyncGenerator[RunEvent, None]:
        started = await _start_turn(info, conversation_id, content, on_busy, model, attachments)
        principal = info.context.require_principal()
        events = await info.context.services.runs.stream(principal, started.run.id, None)
        return _relay(info, principal, started.run.id, events, cancel_on_disconnect)


async def _start_turn(  # noqa: PLR0917 (sendMessage's arguments)
    info: Info[Context, None],
    conversation_id: strawberry.ID,
    content: str,
    on_busy: runs.OnBusy,
    model: str | None,
    attachments: list[strawberry.ID] | None,
) -> runs.StartedRun:
    """A turn as sendMessage (and chat) start it."""
    principal = info.context.require_principal()
    images = [parse_id(a, "attachments") for a in attachments or []]
    vision = info.context.services.vision
    for image in images[: info.context.state.settings.chat.max_attachments]:
        if vision is not None:
            await vision.job(principal, image)  # NOT_FOUND for anyone else's image
    return await info.context.services.runs.send_message(
        principal,
        parse_id(conversation_id, "conversationId"),
        content,
        on_busy,
        model=model,
        attachments=[str(i) for i in images],
    )


async def _relay(
    info: Info[Context, None],
    principal: object,
    run_id: uuid.UUID,
    events: AsyncGenerator[LoggedEvent, None],
    cancel_on_disconnect: bool,
) -> AsyncGenerator[RunEvent, None]:
    finished = False
    try:
        async for event in until_credential_ends(info.context, events):
            finished = event.terminal
            yield _event(event, run_id)
    finally:
        if cancel_on_disconnect and not finished:
            await info.context.services.runs.cancel(principal, run_id, wait=False)  # type: ignore[arg-type]
