"""The /graphql endpoint: HTTP (GET/POST, GraphiQL) and WebSocket (both subscription protocols)."""

from __future__ import annotations

from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import Headers
from starlette.requests import Request
from strawberry.exceptions import ConnectionRejectionError
from strawberry.fastapi import GraphQLRouter
from strawberry.http import GraphQLRequestData
from strawberry.http.parse_content_type import parse_content_type
from strawberry.subscriptions import (
    GRAPHQL_SSE_PROTOCOL,
    GRAPHQL_TRANSPORT_WS_PROTOCOL,
    GRAPHQL_WS_PROTOCOL,
    MULTIPART_SUBSCRIPTION_PROTOCOL,
)
from strawberry.types.unset import UNSET

from backend.auth.errors import InvalidToken
from backend.config import Environment, Settings
from backend.core import untrusted
from backend.graphql.context import Context, get_context
from backend.graphql.protocols import LegacyWSHandler, TransportWSHandler
from backend.graphql.requests import check_operations, place_files
from backend.graphql.schema import build_schema

GRAPHIQL_ASSETS = Path(__file__).resolve().parent / "static" / "graphiql"
GRAPHIQL_URL = "/static/graphiql/"
_CDN = "https://unpkg.com/"

_HTTP_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


class SightlineGraphQLRouter(GraphQLRouter[Any, None]):
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(
        self, *args: Any, max_json_depth: int, max_json_values: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_json_depth = max_json_depth
        self.max_json_values = max_json_values

    def decode_json(self, data: str | bytes) -> object:
        """Bodies, query parameters, multipart fields and socket messages: UTF-8, bounded in
        depth and size, numbers Python can hold (BadJSON is a JSONDecodeError: sockets treat
        it as any malformed message)."""
        return untrusted.loads(data, max_depth=self.max_json_depth, max_values=self.max_json_values)

    def parse_json(self, data: str | bytes) -> Any:
        try:
            return self.decode_json(data)
        except untrusted.BadJSON as exc:
            raise HTTPException(400, f"Unable to parse request body as JSON: {exc}") from None

    async def parse_http_body(
        self, request: AsyncHTTPRequestAdapter
    ) -> GraphQLRequestData | list[GraphQLRequestData]:
        """Strawberry's reading, with the request's shape checked first: Strawberry indexes
        into whatever JSON it was given (a body of `null`, a list of strings: a 500)."""
        content_type, _ = parse_content_type(request.content_type or "")
        transport = self._get_stream_transport_from_headers(request.headers)
        protocol = transport.protocol if transport else "http"
        if request.method == "GET":
            data = self.parse_query_params(request.query_params)
        elif "application/json" in content_type:
            data = self.parse_json(await request.get_body())
        elif self.multipart_uploads_enabled and content_type == "multipart/form-data":
            data = await self.parse_multipart(request)
        else:
            raise HTTPException(400, "Unsupported content type")
        check_operations(data)
        if isinstance(data, list):
            self._validate_batch_request(data, protocol=protocol)
            return [_request_data(item, protocol) for item in data]
        return _request_data(data, protocol)

    async def parse_multipart(self, request: AsyncHTTPRequestAdapter) -> dict[str, str]:
        try:
            form_data = await request.get_form_data()
        except ValueError as exc:
            raise HTTPException(400, "Unable to parse the multipart body") from exc
        fields = form_data.form
        operations, files_map = fields.get("operations"), fields.get("map")
        if not isinstance(operations, str | bytes) or not isinstance(files_map, str | bytes):
            raise HTTPException(400, "a multipart request needs `operations` and `map` fields")
        return place_files(  # type: ignore[no-any-return]
            self.parse_json(operations), self.parse_json(files_map), form_data.files
        )

    @cached_property
    def _offline_ide_html(self) -> str:
        # Same files, same integrity hashes, served by us: GraphiQL works without internet.
        return self.graphql_ide_html.replace(_CDN, GRAPHIQL_URL)

    def should_render_graphql_ide(self, request: Any) -> bool:
        """Browsers (asking for HTML) get GraphiQL; a GET with only a persisted-query hash, or
        from a client that accepts anything, is an operation."""
        params = request.query_params
        return (
            request.method == "GET"
            and params.get("query") is None
            and params.get("extensions") is None
            and "text/html" in request.headers.get("accept", "")
        )

    async def render_graphql_ide(self, request: Any) -> HTMLResponse:
        return HTMLResponse(self._offline_ide_html)

    async def on_ws_connect(self, context: Context) -> Any:
        """Authenticates a socket from `connection_init`: `{"authorization": "Bearer ..."}`.

        A bad credential closes the socket with 4403; no credential leaves it anonymous
        (public fields only). With PostgreSQL or Redis down the socket opens, and what needs
        the caller answers SERVICE_UNAVAILABLE. The credential is watched for revocation
        while the socket lives.
        """
        params = context.connection_params or {}
        credential = params.get("authorization") or params.get("Authorization")
        if credential is None:
            return UNSET
        if not isinstance(credential, str):
            raise ConnectionRejectionError
        await context.authenticate(credential)
        if isinstance(context.auth_error, InvalidToken):
            error = context.auth_error
            raise ConnectionRejectionError({"code": error.code, "message": error.message})
        context.credential_watch()
        return UNSET

    async def run(self, request: Any, context: Any = UNSET, root_value: Any = UNSET) -> Any:
        """Requests refused before execution get a GraphQL-shaped JSON body, not plain text."""
        if isinstance(request, Request):
            _prefer_json(request)
        try:
            return await super().run(request, context=context, root_value=root_value)
        except HTTPException as exc:
            code = _HTTP_CODES.get(exc.status_code, "BAD_REQUEST")
            return JSONResponse(
                {"errors": [{"message": exc.reason, "extensions": {"code": code}}]},
                status_code=exc.status_code,
            )


def _request_data(operation: dict[str, Any], protocol: Any) -> GraphQLRequestData:
    return GraphQLRequestData(
        query=operation.get("query"),
        variables=operation.get("variables"),
        operation_name=operation.get("operationName"),
        extensions=operation.get("extensions"),
        protocol=protocol,
    )


_STREAMS = ("text/event-stream", "multipart/mixed")
_JSON = ("application/graphql-response+json", "application/json")


def _prefer_json(request: Request) -> None:
    """Honours the client's order: Strawberry streams any operation whose Accept merely lists
    an event stream, so a client that puts JSON first (urql's default Accept) would get every
    query as SSE. Such a client gets JSON; one that puts a stream type first streams as before.
    """
    accept = request.headers.get("accept", "")
    parts = [p.strip() for p in accept.split(",") if p.strip()]
    types = [p.split(";", 1)[0].strip().lower() for p in parts]
    if not types or types[0] not in _JSON or not any(t in _STREAMS for t in types):
        return
    kept = ", ".join(p for p, t in zip(parts, types, strict=True) if t not in _STREAMS)
    request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"accept"] + [
        (b"accept", kept.encode("latin-1"))
    ]
    request._headers = Headers(scope=request.scope)  # Starlette caches the parsed headers


def graphql_router(settings: Settings) -> GraphQLRouter[Any, None]:
    gql = settings.graphql
    production = settings.env is Environment.PRODUCTION
    return SightlineGraphQLRouter(
        build_schema(gql, production=production),
        max_json_depth=settings.server.max_json_depth,
        max_json_values=settings.server.max_json_values,
        path="/graphql",
        graphql_ide="graphiql" if gql.graphiql_enabled(production) else None,
        context_getter=get_context,
        subscription_protocols=(
            GRAPHQL_TRANSPORT_WS_PROTOCOL,
            GRAPHQL_WS_PROTOCOL,
            MULTIPART_SUBSCRIPTION_PROTOCOL,
            GRAPHQL_SSE_PROTOCOL,
        ),
        connection_init_wait_timeout=timedelta(seconds=gql.connection_init_timeout_s),
        max_subscriptions_per_connection=gql.max_subscriptions_per_connection,
        keep_alive=True,
        keep_alive_interval=gql.keepalive_interval_s,
        allowed_origins=settings.server.cors_origins,
        # Uploads (ingestDocument). Safe from CSRF: credentials are bearer tokens, never cookies.
        multipart_uploads_enabled=True,
    )
