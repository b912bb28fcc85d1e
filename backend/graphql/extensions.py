"""One span, one metric sample and error shaping per GraphQL operation.

Errors leave the server in one of three shapes:
- an `AppError` raised by a resolver: its message and `extensions.code` (and details); so is
  PostgreSQL or Redis down (`SERVICE_UNAVAILABLE`, never the driver's message or an address)
  and a write for a user who no longer exists (`UNAUTHENTICATED`): `errors.expected_error`;
- a document or variables the server refused before running it: `GRAPHQL_PARSE_FAILED`,
  `GRAPHQL_VALIDATION_FAILED` or `BAD_USER_INPUT` with graphql-core's message;
- anything else (a bug): "Internal server error." with `INTERNAL_SERVER_ERROR`; the exception is
  recorded on the span and logged with its trace id, never sent to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

from graphql import GraphQLError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from strawberry.extensions import SchemaExtension
from strawberry.types.execution import ExecutionContext
from strawberry.types.graphql import OperationType

from backend.errors import AppError, InternalError, expected_error

log = logging.getLogger("backend.graphql")

MASKED_MESSAGE = "Internal server error."


def is_unexpected(error: GraphQLError) -> bool:
    """A resolver raised something that is not an AppError: a bug, to be masked."""
    original = error.original_error
    if (
        original is None
        or isinstance(original, GraphQLError)
        or expected_error(original) is not None
    ):
        return False
    # Variable coercion failures carry the scalar's ValueError/TypeError but have no path.
    return error.path is not None


def shape_error(error: GraphQLError) -> GraphQLError:
    """The client-facing form of one error (see the module docstring)."""
    original = error.original_error
    typed = expected_error(original) if original is not None else None
    if typed is not None:  # an AppError, or a backing service down, or a user gone
        code_and_details = typed.to_extensions()
        message = typed.message
    elif is_unexpected(error):
        code_and_details = InternalError(MASKED_MESSAGE).to_extensions()
        message = MASKED_MESSAGE
    else:
        if error.extensions and "code" in error.extensions:
            return error
        if error.message.startswith("Syntax Error"):
            code = "GRAPHQL_PARSE_FAILED"
        elif original is not None or error.message.startswith("Variable "):
            code = "BAD_USER_INPUT"
        else:
            code = "GRAPHQL_VALIDATION_FAILED"
        code_and_details = {"code": code}
        message = error.message
    return GraphQLError(
        message=message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        original_error=None,
        extensions={**(error.extensions or {}), **code_and_details},
    )


def operation_type(ctx: ExecutionContext) -> str:
    """query/mutation/subscription; "unknown" when the document did not parse or name one."""
    if ctx.graphql_document is None:
        return "unknown"
    try:
        return ctx.operation_type.value
    except RuntimeError:  # e.g. an operationName the document does not define
        return "unknown"


def _outcome(errors: list[GraphQLError] | None) -> str:
    if not errors:
        return "ok"
    if any(
        error.extensions and error.extensions.get("code") == InternalError.code for error in errors
    ):
        return "server_error"
    return "client_error"


class OperationObservability(SchemaExtension):
    """Span + metrics + error shaping. State lives on the instance: one instance per operation."""

    def __init__(self, *, execution_context: ExecutionContext | None = None) -> None:
        if execution_context is not None:
            self.execution_context = execution_context
        self._span: trace.Span | None = None
        self._errors: list[GraphQLError] = []
        self._subscription_label: str | None = None

    def _state(self) -> Any:
        return self.execution_context.context.state

    def on_operation(self) -> Iterator[None]:
        state = self._state()
        started = time.perf_counter()
        tracer = state.tracer_provider.get_tracer("sightline.graphql")
        self._span = span = tracer.start_span("graphql.operation", kind=SpanKind.INTERNAL)
        token = otel_context.attach(trace.set_span_in_context(span))
        abandoned = False
        try:
            yield
            self._finish_result(self.execution_context.result)
        except GeneratorExit:
            # Closed without finishing: a dropped subscription's hook, finalised by the garbage
            # collector, which may run it inside any allocation, even inside a prometheus
            # metric's (non-reentrant) lock held by this thread. Record later, from the loop.
            abandoned = True
            raise
        except Exception as exc:
            # Raised by a hook (a rate limit, say): Strawberry turns it into the result after
            # this operation ends, with the exception's message and extensions, unshaped; so a
            # backing service that is down leaves here as SERVICE_UNAVAILABLE, not as the
            # driver's message. (Strawberry's own errors about the request pass through.)
            self._errors.append(shape_error(GraphQLError(str(exc), original_error=exc)))
            if isinstance(exc, AppError):
                raise
            span.record_exception(exc)
            typed = expected_error(exc)
            if typed is None:
                raise
            raise typed from exc
        finally:
            with contextlib.suppress(Exception):  # detached elsewhere when finalised
                otel_context.detach(token)
            record = functools.partial(self._record_operation, state, span, started)
            loop = _running_loop() if abandoned else None
            if loop is None:
                record()
            else:
                loop.call_soon(record)

    def _record_operation(self, state: Any, span: trace.Span, started: float) -> None:
        """The operation's span and metrics, once it has ended."""
        ctx = self.execution_context
        kind = operation_type(ctx)
        label = state.metrics.operation_label(ctx.operation_name)
        span.update_name(f"graphql.{kind} {ctx.operation_name or 'anonymous'}")
        span.set_attribute("graphql.operation.name", ctx.operation_name or "")
        span.set_attribute("graphql.operation.type", kind)
        outcome = _outcome(self._errors)
        if outcome == "server_error":
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        state.metrics.graphql_operations.labels(label, kind, outcome).inc()
        # Both result hooks may have seen the same (already shaped) error object: once each.
        for error in {id(e): e for e in self._errors}.values():
            code = (error.extensions or {}).get("code")
            state.metrics.error("graphql", code, label)
        if self._subscription_label is not None:
            state.metrics.subscriptions_active.labels(self._subscription_label).dec()
        else:
            state.metrics.graphql_latency.labels(label, kind).observe(time.perf_counter() - started)

    def on_execute(self) -> Iterator[None]:
        ctx = self.execution_context
        if operation_type(ctx) != OperationType.SUBSCRIPTION.value:
            yield
            return
        started = time.perf_counter()
        state = self._state()
        label = state.metrics.operation_label(ctx.operation_name)
        state.metrics.subscriptions_active.labels(label).inc()
        self._subscription_label = label
        yield
        state.metrics.graphql_latency.labels(label, "subscription").observe(
            time.perf_counter() - started
        )

    def on_stream_result(self, result: Any) -> Iterator[None]:
        self._finish_result(result)
        yield

    def _finish_result(self, result: Any) -> None:
        errors = getattr(result, "errors", None)
        if not errors:
            return
        span = self._span
        for error in errors:
            if is_unexpected(error) and span is not None:
                span.record_exception(error.original_error or error)
        shaped = [shape_error(error) for error in errors]
        result.errors = shaped
        # Both hooks may see the final result; shaping is idempotent, so twice is harmless.
        self._errors.extend(shaped)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
