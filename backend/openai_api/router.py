"""The OpenAI-compatible endpoints under /v1: chat completions (JSON or SSE), models, embeddings.

Callers authenticate as on /graphql (an API key or an access token as a Bearer token, through
AuthService.authenticate); a missing scope is refused and audited as GraphQL's permission
classes do. Every error, refusals before the model included, comes in OpenAI's shape with its
HTTP status; one that happens once a stream has started is its last event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from backend.auth.errors import MissingScope
from backend.auth.principal import Principal
from backend.auth.scopes import Scope as AuthScope
from backend.auth.service import AuthService
from backend.config import ServerSettings
from backend.core import untrusted
from backend.core.tasks import cancel_and_wait
from backend.errors import (
    AppError,
    InternalError,
    Unauthenticated,
    ValidationFailed,
    expected_error,
)
from backend.inference.llm.base import LLMError, LLMTimeout, LLMUnavailable
from backend.openai_api.schemas import ChatCompletionRequest, EmbeddingRequest
from backend.openai_api.service import Completion, OpenAIService, Piece

log = logging.getLogger(__name__)

PREFIX = "/v1"
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# OpenAI's error types by status, and its codes where it has one for the same refusal.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_CODES = {
    "UNAUTHENTICATED": "invalid_api_key",
    "MODEL_NOT_FOUND": "model_not_found",
    "RATE_LIMITED": "rate_limit_exceeded",
    "BUDGET_EXCEEDED": "insufficient_quota",
}
_LLM_STATUS = {LLMUnavailable: 503, LLMTimeout: 504}


def error_code(exc: BaseException) -> str:
    """Sightline's code of an exception (what sightline_errors_total counts it under)."""
    if isinstance(exc, LLMError):
        return exc.code
    typed = expected_error(exc)
    return InternalError.code if typed is None else typed.code


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of an exception (a bug is a masked 500)."""
    if isinstance(exc, LLMError):
        status = next((s for kind, s in _LLM_STATUS.items() if isinstance(exc, kind)), 502)
        return status, {
            "error": {
                "message": str(exc) or "the model failed",
                "type": "server_error",
                "param": None,
                "code": exc.code.lower(),
            }
        }
    typed = expected_error(exc)
    if typed is None:
        log.error("unhandled error", exc_info=exc)
        typed = InternalError("Internal server error.")
    error: dict[str, Any] = {
        "message": typed.message,
        "type": _TYPES.get(typed.status, "server_error"),
        "param": typed.details.get("field"),
        "code": _CODES.get(typed.code, typed.code.lower()),
    }
    if typed.details.get("problems"):
        error["problems"] = typed.details["problems"]
    return typed.status, {"error": error}


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    response = JSONResponse(body, status_code=status)
    retry_after = exc.details.get("retryAfter") if isinstance(exc, AppError) else None
    # A used-up budget says no when it renews: it has no Retry-After, a rate limit has its own.
    if isinstance(retry_after, int | float) or status == 503:
        seconds = retry_after if isinstance(retry_after, int | float) else 1
        response.headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return response


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class OpenAIRoute(APIRoute):
    """Errors of these routes in OpenAI's shape (the app's own handlers answer in Sightline's)."""

    # Told each error's route path and code (the app counts them); set by `openai_router`.
    on_error: ClassVar[Callable[[str, str], None] | None] = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (ClientGone, ClientDisconnect):  # gone before its answer, or mid-body
                return Response(status_code=499)  # nginx's "client closed request": for the log
            except Exception as exc:
                if self.on_error is not None:
                    self.on_error(self.path, error_code(exc))
                return error_response(exc)

        return handle


class EventStream(StreamingResponse):
    """Server-sent events whose producer is stopped as soon as the client disconnects (the
    model with it), whatever ASGI version the server speaks: Starlette only notices a gone
    client at the next write under ASGI 2.4, which may be long after (a model thinking)."""

    body_iterator: AsyncIterator[str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait([streaming, watching], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([streaming, watching])
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        if not streaming.cancelled() and (failure := streaming.exception()) is not None:
            raise failure  # a bug: not swallowed

    async def _stream(self, send: Send) -> None:
        with contextlib.suppress(OSError):  # the client left: the watcher says so too
            await self.stream_response(send)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (ClientGone) when the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait([watcher, task])
    if task.cancelled():
        raise ClientGone
    return task.result()


async def read_body(request: Request, model: type[M], server: ServerSettings) -> M:
    """The body as `model`: bounded JSON (as on /graphql), then validated (BAD_USER_INPUT)."""
    raw = await request.body()
    try:
        data = untrusted.loads(
            raw, max_depth=server.max_json_depth, max_values=server.max_json_values
        )
    except untrusted.BadJSON as exc:
        raise ValidationFailed(f"the body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ValidationFailed(
            f"{where}: {first['msg']}",
            field=where,
            problems=[
                {"path": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                for e in exc.errors()
            ],
        ) from None


def openai_router(
    openai_of: Callable[[Request], OpenAIService],
    auth_of: Callable[[Request], AuthService],
    server: ServerSettings,
    on_error: Callable[[str, str], None] | None = None,
) -> APIRouter:
    route_class = type("Route", (OpenAIRoute,), {"on_error": staticmethod(on_error)})
    router = APIRouter(prefix=PREFIX, tags=["openai"], route_class=route_class)

    async def caller(request: Request, scope: AuthScope) -> Principal:
        credential = request.headers.get("authorization") or request.headers.get("x-api-key")
        if not credential:
            raise Unauthenticated(
                "authentication required: send `Authorization: Bearer <API key or access token>`"
            )
        auth = auth_of(request)
        principal = await auth.authenticate(credential)  # InvalidToken: 401
        if not principal.has(scope):
            client = request.client.host if request.client else None
            await auth.record_denial(principal, f"{request.method} {request.url.path}", client)
            raise MissingScope(f"the {scope.value} scope is required", scope=scope.value)
        return principal

    @router.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The chat model aliases (`model` of /v1/chat/completions)."""
        principal = await caller(request, AuthScope.CHAT)
        service = openai_of(request)
        await service.enforce_query(principal)
        return {"object": "list", "data": [_model(m.alias) for m in service.chat_models()]}

    @router.get("/models/{alias}")
    async def get_model(alias: str, request: Request) -> dict[str, Any]:
        principal = await caller(request, AuthScope.CHAT)
        service = openai_of(request)
        await service.enforce_query(principal)
        return _model(service.chat_model(alias).alias)

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        """A chat completion from a model alias, whole or streamed (SSE)."""
        principal = await caller(request, AuthScope.CHAT)
        asked = await read_body(request, ChatCompletionRequest, server)
        service = openai_of(request)
        completion = service.prepare(asked, principal)
        # Ends (UNAUTHENTICATED) when the credential is revoked or expires, as GraphQL streams do.
        watch = auth_of(request).revocations.watch(principal)
        pieces = watch.relay(service.stream(principal, completion))
        try:
            # Up to the first piece of text before the status line: a refusal (rate limit,
            # budget) or a model that cannot be reached is an HTTP status, not a stream event.
            first = await _unless_disconnected(request, _until_text(pieces))
            if not asked.stream:
                rest = await _unless_disconnected(request, _collect(pieces))
                return JSONResponse(_whole(completion, [*first, *rest]))
        except BaseException:
            await pieces.aclose()  # type: ignore[attr-defined]
            raise
        return EventStream(
            _events(completion, first, pieces),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @router.post("/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        """Embeddings from the knowledge base's embedding model."""
        principal = await caller(request, AuthScope.KNOWLEDGE_READ)
        asked = await read_body(request, EmbeddingRequest, server)
        vectors, tokens = await openai_of(request).embed(principal, asked)
        return {
            "object": "list",
            "model": asked.model,
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": _base64(v) if asked.encoding_format == "base64" else v,
                }
                for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return router


def _model(alias: str) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": 0, "owned_by": "sightline"}


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _until_text(pieces: AsyncIterator[Piece]) -> list[Piece]:
    taken: list[Piece] = []
    async for piece in pieces:
        taken.append(piece)
        if piece.text:
            break
    return taken


async def _collect(pieces: AsyncIterator[Piece]) -> list[Piece]:
    return [piece async for piece in pieces]


def _whole(completion: Completion, pieces: list[Piece]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model.pinned,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(p.text for p in pieces)},
                "finish_reason": completion.finish_reason or "stop",
            }
        ],
        "usage": completion.usage(),
    }
    extension = completion.extension()
    if extension is not None:
        body["sightline"] = extension
    return body


async def _events(
    completion: Completion, first: list[Piece], pieces: AsyncIterator[Piece]
) -> AsyncIterator[str]:
    """The chunks of a streamed completion. The per-token chunk is text around the piece's
    JSON string (one json.dumps per token, not of the whole chunk)."""
    usage = completion.request.include_usage
    head = json.dumps(
        {
            "id": completion.id,
            "object": "chat.completion.chunk",
            "created": completion.created,
            "model": completion.model.pinned,
        }
    )[:-1]
    tail = ',"usage":null}' if usage else "}"
    token_head = f'data: {head},"choices":[{{"index":0,"delta":{{"content":'
    token_tail = f'}},"finish_reason":null}}]{tail}\n\n'

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        fields = json.dumps({"choices": [choice], **extra})[1:]
        return f"data: {head},{fields[:-1]}{tail}\n\n"

    def render(piece: Piece) -> str:
        if piece.rail is not None:
            delta = {"content": piece.text} if piece.text else {}
            return chunk(delta, sightline={"guardrails": [piece.rail]})
        return f"{token_head}{json.dumps(piece.text)}{token_tail}"

    yield chunk({"role": "assistant", "content": ""})
    try:
        for piece in first:
            yield render(piece)
        async for piece in pieces:
            yield render(piece)
    except Exception as exc:
        _, error = error_body(exc)
        yield f"data: {json.dumps(error)}\n\n"
        return
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
    # the sources and citations (the rails went out with the chunks they apply to)
    extension = completion.extension(rails=False)
    extra = {} if extension is None else {"sightline": extension}
    yield chunk({}, completion.finish_reason or "stop", **extra)
    if usage:
        yield f'data: {head},"choices":[],"usage":{json.dumps(completion.usage())}}}\n\n'
    yield "data: [DONE]\n\n"
