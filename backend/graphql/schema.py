"""Builds the Strawberry schema with its limits, and prints it as SDL (schema.graphql)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

import strawberry
from graphql import GraphQLError, GraphQLObjectType, parse
from graphql.execution.collect_fields import CollectedFields, FieldDetailsList, collect_subfields
from strawberry.extensions import (
    DisableIntrospection,
    SchemaExtension,
)
from strawberry.schema.config import BatchingConfig, StrawberryConfig
from strawberry.schema.schema import (
    DEFAULT_ALLOWED_OPERATION_TYPES,
    StrawberryGraphQLCoreExecutionContext,
)
from strawberry.types.execution import ExecutionContext, ExecutionResult, PreExecutionError
from strawberry.types.graphql import OperationType

from backend.config import GraphQLSettings
from backend.errors import expected_error
from backend.graphql.extensions import OperationObservability, is_unexpected
from backend.graphql.inputs import StorableInput
from backend.graphql.knowledge import INGESTION_EVENT_TYPES
from backend.graphql.persisted import PersistedQueries
from backend.graphql.queries import Mutation, Query
from backend.graphql.ratelimits import RateLimits
from backend.graphql.runs import RUN_EVENT_TYPES
from backend.graphql.subscriptions import Subscription
from backend.graphql.validation import document_checks
from backend.graphql.vision import VISION_EVENT_TYPES

log = logging.getLogger("backend.graphql")

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schema.graphql"


class SightlineSchema(strawberry.Schema):
    async def execute(self, *args: Any, **kwargs: Any) -> ExecutionResult:
        """Runs a query or mutation; a subscription here is refused with a coded error.

        `execute` serves plain request/response HTTP, which cannot carry a stream. Strawberry
        would run the subscription resolver as a query field and fail on its async generator.
        Over HTTP, subscriptions use the multipart or SSE transports, which call `subscribe`.
        """
        allowed = kwargs.get("allowed_operation_types") or DEFAULT_ALLOWED_OPERATION_TYPES
        kwargs["allowed_operation_types"] = set(allowed) - {OperationType.SUBSCRIPTION}
        return await super().execute(*args, **kwargs)

    async def stream(self, *args: Any, **kwargs: Any) -> Any:
        """Streams an operation (SSE, multipart, both WebSocket protocols) whose refusal by a
        hook before it starts is its one result.

        Strawberry's stream lets an exception that a hook raises before the operation starts
        (an unknown or unreachable persisted query) escape: the stream ends with no answer, or
        the HTTP response breaks off. A typed error becomes the pre-execution error that every
        transport sends as the operation's error.
        """
        return _answered(await super().stream(*args, **kwargs))

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Logs bugs with their traceback; expected and client errors are not server problems."""
        for error in errors:
            if is_unexpected(error):
                log.error(
                    "unexpected error in %s at %s",
                    (execution_context and execution_context.operation_name) or "anonymous",
                    ".".join(str(p) for p in error.path or ()),
                    exc_info=error.original_error,
                )


async def _answered(source: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    started = False
    async with aclosing(source):
        try:
            async for result in source:
                started = True
                yield result
        except Exception as exc:
            typed = expected_error(exc)
            if typed is None or started:
                raise
            error = GraphQLError(typed.message, extensions=typed.extensions)
            yield PreExecutionError(data=None, errors=[error])


class Executor(StrawberryGraphQLCoreExecutionContext):
    """Collects an object's subfields once per operation, not once per subscription event.

    graphql-core memoises subfield collection by the identity of the field list it is given,
    but every subscription event gets new lists: each event collected its subfields again (a
    third of the cost of sending a token) and added an entry to a cache that lived as long as
    the subscription. Keyed here by the document's nodes, which stay the same for every event.
    """

    def collect_subfields(
        self, return_type: GraphQLObjectType, field_details_list: FieldDetailsList
    ) -> CollectedFields:
        key = (
            return_type,
            *(
                (id(d.node), id(d.defer_usage), id(d.fragment_variable_values))
                for d in field_details_list
            ),
        )
        cached = self._relevant_sub_fields.get(key)  # type: ignore[call-overload]
        if cached is not None:
            return cached[1]
        collected = collect_subfields(
            self.schema,
            self.fragments,
            self.variable_values,
            self.operation,
            return_type,
            field_details_list,
            self.hide_suggestions,
        )
        # The list is kept with its entry: the ids in the key stay unique while it lives.
        self._relevant_sub_fields[key] = (field_details_list, collected)  # type: ignore[index]
        return collected


class QuietExecutor(Executor):
    """Production: variable and argument errors suggest no names ("Did you mean ..."), as the
    validation rules there do not: a schema without introspection should not spell itself out."""

    @classmethod
    def build(cls, *args: Any, **kwargs: Any) -> Any:
        kwargs["hide_suggestions"] = True
        return super().build(*args, **kwargs)


_parse = lru_cache(maxsize=1024)(parse)


class CachedParse(SchemaExtension):
    """Reuses the parsed document of a query text seen before (clients repeat their queries).

    A document that does not parse is left to Strawberry, which reports it as a GraphQL error;
    Strawberry's own ParserCache raises instead, which loses the error's code.
    """

    def on_parse(self) -> Iterator[None]:
        ctx = self.execution_context
        if ctx.query and ctx.graphql_document is None:
            options = ctx.parse_options
            with suppress(GraphQLError):
                ctx.graphql_document = _parse(ctx.query, max_tokens=options.get("max_tokens"))
        yield


def build_schema(settings: GraphQLSettings, *, production: bool = False) -> strawberry.Schema:
    # Factories, not instances: Strawberry stores the operation on the extension, so a shared
    # instance would mix up concurrent operations. Document checks come before the parse cache:
    # they set the parser's token limit.
    extensions: list[type[SchemaExtension] | Callable[[], SchemaExtension]] = [
        OperationObservability,
        StorableInput,
        PersistedQueries,
        RateLimits,
        document_checks(settings, production=production),
        CachedParse,
    ]
    if not settings.introspection_enabled(production):
        extensions.append(DisableIntrospection)
    batching = (
        BatchingConfig(max_operations=settings.max_batch_operations)
        if settings.max_batch_operations
        else None
    )
    return SightlineSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=extensions,
        types=(*RUN_EVENT_TYPES, *INGESTION_EVENT_TYPES, *VISION_EVENT_TYPES),
        config=StrawberryConfig(batching_config=batching),
        execution_context_class=QuietExecutor if production else Executor,
    )


def schema_sdl() -> str:
    """The SDL that `schema.graphql` must equal (limits do not change the SDL)."""
    return build_schema(GraphQLSettings()).as_str().rstrip() + "\n"
