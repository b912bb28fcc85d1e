"""Builds the Strawberry schema with its limits, and prints it as SDL (schema.graphql)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

import strawberry
from graphql import ExecutionResult as CoreResult
from graphql import (
    GraphQLError,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    Undefined,
    is_abstract_type,
    parse,
)
from graphql import OperationType as CoreOperationType
from graphql.execution.collect_fields import (
    CollectedFields,
    FieldDetailsList,
    collect_fields,
    collect_subfields,
)
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
    """Collects an object's subfields once per operation, not once per subscription event, and
    answers the events that need no execution at once.

    graphql-core memoises subfield collection by the identity of the field list it is given,
    but every subscription event gets new lists: each event collected its subfields again (a
    third of the cost of sending a token) and added an entry to a cache that lived as long as
    the subscription. Keyed here by the document's nodes, which stay the same for every event.

    An event whose selected fields are all plain attributes of scalar type (a TokenDelta's
    `text`, `index`, `cursor`, `__typename`: every token of every stream) is answered from a
    plan made once per operation and event type (`_FlatPlan`), without a pass through the
    executor: the same result, for a fraction of the cost. Anything else (a resolver, an
    argument, a nested object, a null, a value the scalar refuses) is executed as usual.
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

    def build_per_event_executor(self, payload: Any) -> Any:
        plans: dict[type, _FlatPlan | None] = self.__dict__.setdefault("_flat_plans", {})
        kind = type(payload)
        if kind not in plans:
            plans[kind] = _FlatPlan.of(self, kind)
        plan = plans[kind]
        if plan is not None:
            answered = plan.answer(payload)
            if answered is not None:
                return answered
        return super().build_per_event_executor(payload)


class _Answered:
    """A per-event executor whose result is already made."""

    __slots__ = ("result",)

    def __init__(self, result: CoreResult) -> None:
        self.result = result

    def execute_operation(self, serially: bool | None = None) -> CoreResult:
        return self.result


class _FlatPlan:
    """How a subscription operation answers events of one type whose selected fields are all
    plain attributes of scalar types: the root field's response key, and per
    response key the attribute and its scalar (None for `__typename`)."""

    __slots__ = ("fields", "root_key", "type_name")

    def __init__(
        self,
        root_key: str,
        type_name: str,
        fields: list[tuple[str, str, GraphQLScalarType | None]],
    ) -> None:
        self.root_key = root_key
        self.type_name = type_name
        self.fields = fields

    @classmethod
    def of(cls, executor: Executor, kind: type) -> _FlatPlan | None:
        """The plan for events of `kind`, or None when they must be executed."""
        object_type = _object_type(executor.schema, kind)
        root = _root_field(executor, object_type) if object_type is not None else None
        if object_type is None or root is None:
            return None
        root_key, details = root
        selected = executor.collect_subfields(object_type, details)
        if selected.new_defer_usages:
            return None
        fields: list[tuple[str, str, GraphQLScalarType | None]] = []
        for key, field_details in selected.grouped_field_set.items():
            name = field_details[0].node.name.value
            if name == "__typename":
                fields.append((key, "", None))
                continue
            attribute = _plain_scalar(object_type, name)
            if attribute is None:
                return None
            fields.append((key, *attribute))
        return cls(root_key, object_type.name, fields)

    def answer(self, payload: Any) -> _Answered | None:
        """The event's result, or None when it must be executed (a null, a refused value)."""
        data: dict[str, Any] = {}
        for key, attribute, scalar in self.fields:
            if scalar is None:
                data[key] = self.type_name
                continue
            value = getattr(payload, attribute, None)
            if value is None:
                return None  # the executor says what a null means here
            try:
                serialized = scalar.serialize(value)
            except Exception:  # the executor reports it as the field's error
                return None
            if serialized is None or serialized is Undefined:
                return None
            data[key] = serialized
        return _Answered(CoreResult({self.root_key: data}, None))


@lru_cache(maxsize=256)
def _object_type(schema: GraphQLSchema, kind: type) -> GraphQLObjectType | None:
    """The schema's object type built from the Strawberry type `kind`."""
    for named in schema.type_map.values():
        if isinstance(named, GraphQLObjectType):
            definition = (named.extensions or {}).get("strawberry-definition")
            if definition is not None and getattr(definition, "origin", None) is kind:
                return named
    return None


def _root_field(
    executor: Executor, object_type: GraphQLObjectType
) -> tuple[str, FieldDetailsList] | None:
    """The subscription's one root field (its response key and nodes), when its value can be
    an object of `object_type` and nothing is deferred."""
    schema, operation = executor.schema, executor.operation
    root_type = schema.subscription_type
    if root_type is None or operation.operation is not CoreOperationType.SUBSCRIPTION:
        return None
    root = collect_fields(
        schema,
        executor.fragments,
        executor.variable_values,
        root_type,
        operation,
        executor.hide_suggestions,
    )
    if len(root.grouped_field_set) != 1 or root.new_defer_usages:
        return None
    ((root_key, details),) = root.grouped_field_set.items()
    root_field = root_type.fields.get(details[0].node.name.value)
    if root_field is None:
        return None
    returned = root_field.type
    if isinstance(returned, GraphQLNonNull):
        returned = returned.of_type
    if returned is object_type or (
        is_abstract_type(returned) and schema.is_sub_type(returned, object_type)  # type: ignore[arg-type]
    ):
        return root_key, details
    return None


def _plain_scalar(
    object_type: GraphQLObjectType, name: str
) -> tuple[str, GraphQLScalarType] | None:
    """(attribute, scalar) when field `name` is read straight off the object: a scalar, no
    arguments, no resolver, permission or field extension of its own."""
    field = object_type.fields.get(name)
    if field is None or field.args:
        return None
    scalar = field.type.of_type if isinstance(field.type, GraphQLNonNull) else field.type
    if not isinstance(scalar, GraphQLScalarType):
        return None
    definition = (field.extensions or {}).get("strawberry-definition")
    if (
        definition is None
        or definition.base_resolver is not None
        or definition.permission_classes
        or definition.extensions
    ):
        return None
    return definition.python_name, scalar


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
