"""Chat runs in the schema: sendMessage, cancelRun and the resumable runEvents subscription."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from datetime import datetime

import strawberry
from strawberry.types import Info

from backend.agents import runs
from backend.core import models
from backend.graphql.chat import CHAT, MessageType
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import until_credential_expires
from backend.realtime.eventlog import RunEvent as LoggedEvent

RunStatus = strawberry.enum(models.RunStatus, name="RunStatus")
OnBusy = strawberry.enum(
    runs.OnBusy,
    name="OnBusy",
    description="Double texting: REJECT (RUN_IN_PROGRESS), INTERRUPT the running turn, or "
    "ENQUEUE after it.",
)


@strawberry.type
class ChatRun:
    id: strawberry.ID
    conversation_id: strawberry.ID
    status: RunStatus  # type: ignore[valid-type]
    model: str
    error_code: str | None
    created_at: datetime

    @classmethod
    def of(cls, run: models.Run) -> ChatRun:
        return cls(
            id=strawberry.ID(str(run.id)),
            conversation_id=strawberry.ID(str(run.conversation_id)),
            status=run.status,
            model=run.model,
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
    model: str


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


# Listed for the schema: they are only reachable through the RunEvent interface.
RUN_EVENT_TYPES = (RunStarted, TokenDelta, RunCompleted, RunFailed, RunCancelled)


def _usage(data: dict) -> Usage:
    usage = data.get("usage") or {}
    return Usage(
        prompt_tokens=int(usage.get("promptTokens", 0)),
        completion_tokens=int(usage.get("completionTokens", 0)),
        cost=float(usage.get("cost", 0.0)),
    )


def _event(event: LoggedEvent) -> RunEvent:
    data, cursor = event.data, event.cursor
    message_id = strawberry.ID(data["messageId"]) if data.get("messageId") else None
    if event.type == "TokenDelta":
        return TokenDelta(cursor=cursor, text=data["text"], index=int(data["index"]))
    if event.type == "RunStarted":
        return RunStarted(cursor=cursor, model=str(data.get("model", "")))
    if event.type == "RunCompleted":
        return RunCompleted(
            cursor=cursor,
            message_id=message_id,
            usage=_usage(data),
            latency_ms=float(data.get("latencyMs", 0)),
        )
    if event.type == "RunCancelled":
        return RunCancelled(cursor=cursor, message_id=message_id)
    return RunFailed(
        cursor=cursor,
        code=str(data.get("code", "INTERNAL_SERVER_ERROR")),
        message=str(data.get("message", "")),
        message_id=message_id,
    )


@strawberry.type
class RunMutation:
    @strawberry.mutation(
        permission_classes=CHAT,
        description="Starts a turn; subscribe to runEvents(runId) for the answer.",
    )
    async def send_message(
        self,
        info: Info[Context, None],
        conversation_id: strawberry.ID,
        content: str,
        on_busy: OnBusy = runs.OnBusy.REJECT,  # type: ignore[valid-type]
    ) -> SentMessage:
        started = await info.context.services.runs.send_message(
            info.context.require_principal(),
            parse_id(conversation_id, "conversationId"),
            content,
            on_busy,
        )
        return SentMessage(
            run=ChatRun.of(started.run), message=MessageType.of(started.user_message)
        )

    @strawberry.mutation(
        permission_classes=CHAT,
        description="Stops a run and its model call (on whichever replica).",
    )
    async def cancel_run(self, info: Info[Context, None], run_id: strawberry.ID) -> ChatRun:
        run = await info.context.services.runs.cancel(
            info.context.require_principal(), parse_id(run_id, "runId")
        )
        return ChatRun.of(run)


@strawberry.type
class RunQuery:
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


async def _relay(
    info: Info[Context, None],
    principal: object,
    run_id: uuid.UUID,
    events: AsyncGenerator[LoggedEvent, None],
    cancel_on_disconnect: bool,
) -> AsyncGenerator[RunEvent, None]:
    finished = False
    try:
        async for event in until_credential_expires(info.context.principal, events):
            finished = event.terminal
            yield _event(event)
    finally:
        if cancel_on_disconnect and not finished:
            await info.context.services.runs.cancel(principal, run_id)  # type: ignore[arg-type]
