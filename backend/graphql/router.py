"""The /graphql endpoint: HTTP (GET/POST, GraphiQL) and WebSocket (both subscription protocols)."""

from __future__ import annotations

from datetime import timedelta

from strawberry.fastapi import GraphQLRouter
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL

from backend.config import Settings
from backend.graphql.context import get_context
from backend.graphql.schema import build_schema


def graphql_router(settings: Settings) -> GraphQLRouter:
    gql = settings.graphql
    return GraphQLRouter(
        build_schema(gql),
        path="/graphql",
        graphql_ide="graphiql" if gql.graphiql else None,
        context_getter=get_context,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL),
        connection_init_wait_timeout=timedelta(seconds=gql.connection_init_timeout_s),
        max_subscriptions_per_connection=gql.max_subscriptions_per_connection,
        keep_alive=True,
        keep_alive_interval=gql.keepalive_interval_s,
        allowed_origins=settings.server.cors_origins,
        multipart_uploads_enabled=False,
    )
