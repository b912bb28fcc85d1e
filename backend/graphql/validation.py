"""Validation of GraphQL documents: off the event loop, under a time budget, cached by text.

graphql-core validates synchronously, and Strawberry runs it on the event loop: a document that
is slow to validate stopped every other request, probes included. Here the rules run in a small
thread pool; the loop only awaits. Every rule of ours is linear in the document (see `limits`),
the document's size is bounded by the parser's token limit, and a validation that still outlives
its budget is answered with a typed error and interrupted in its thread.

A document with several operations must name the one to run: graphql-core's executor would
refuse it, but Strawberry picks the first operation before the executor sees the document.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from graphql import (
    ASTValidationRule,
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    OverlappingFieldsCanBeMergedRule,
    ValidationContext,
    specified_rules,
    validate,
)
from graphql.validation.validate import ValidationAbortedError
from strawberry.extensions import SchemaExtension
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule

from backend.config import GraphQLSettings
from backend.errors import AppError
from backend.graphql.limits import DocumentLimits, limits_rule


class DocumentRefused(AppError):
    """The document is well formed but cannot be run as sent."""

    code = "GRAPHQL_VALIDATION_FAILED"
    status = 400


class ValidationTimeout(Exception):
    """Raised inside a validation thread whose budget ran out."""


def bounded_rules(merge_budget: int) -> tuple[type[ASTValidationRule], ...]:
    """The specified rules, the field-merging one with our own budget of comparisons.

    graphql-core meters that rule (500,000 units by default, about a second of CPU here) and
    aborts the validation when they run out; documents within our limits need far fewer.
    """

    class BoundedOverlappingFields(OverlappingFieldsCanBeMergedRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            self.rule_context.remaining_complexity_budget = merge_budget

    return tuple(
        BoundedOverlappingFields if rule is OverlappingFieldsCanBeMergedRule else rule
        for rule in specified_rules
    )


# CPU time each validation thread spent in the garbage collector. A full collection walks every
# object of the process and runs in whichever thread allocated last: its cost is the process's,
# not the document's, and must not count against a document's budget.
_gc_cpu: dict[int, float] = {}  # thread ident -> seconds in collections that ended
_gc_began: dict[int, float] = {}  # thread ident -> its CPU clock when a collection began
_gc_watched: set[int] = set()  # the validation threads


def _gc_timer(phase: str, _info: dict[str, Any]) -> None:
    ident = threading.get_ident()
    if ident not in _gc_watched:
        return
    if phase == "start":
        _gc_began[ident] = time.thread_time()
        return
    began = _gc_began.pop(ident, None)
    if began is not None:
        _gc_cpu[ident] = _gc_cpu.get(ident, 0.0) + time.thread_time() - began


gc.callbacks.append(_gc_timer)


def _gc_seconds(ident: int, now: float) -> float:
    """A validation thread's CPU time in collections so far (`now`: its CPU clock)."""
    began = _gc_began.get(ident)
    return _gc_cpu.get(ident, 0.0) + (now - began if began is not None else 0.0)


class _Interruptible:
    """Runs a job in a pool thread and can raise `ValidationTimeout` inside it, once, while it
    is still running that job and never after (the job's end and the interruption share a
    lock, so an interruption cannot land in the thread's next job). Knows the CPU time the job
    has used: on a busy machine a job waits for the CPU, which is not the document's cost."""

    def __init__(self, job: Callable[[], Any]) -> None:
        self._job = job
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._done = False
        self.finished = False  # ran to its end (its result may still be on its way to the loop)
        self._cpu_clock: int | None = None
        self._cpu_start = 0.0
        self._gc_start = 0.0
        self._wall_start = 0.0

    def cpu_seconds(self) -> float:
        """CPU time the job has used so far (wall time where threads have no CPU clock)."""
        if self._thread is None:
            return 0.0
        if self._cpu_clock is None:
            return time.monotonic() - self._wall_start
        try:
            now = time.clock_gettime(self._cpu_clock)
        except OSError:  # the thread is gone: the job has ended
            return 0.0
        collecting = _gc_seconds(self._thread, now) - self._gc_start
        return max(0.0, now - self._cpu_start - collecting)

    def run(self) -> Any:
        with self._lock:
            if self._done:  # interrupted before it started
                raise ValidationTimeout
            ident = threading.get_ident()
            self._wall_start = time.monotonic()
            with contextlib.suppress(AttributeError, OSError):  # Linux and most Unixes have it
                self._cpu_clock = time.pthread_getcpuclockid(ident)
                self._cpu_start = time.clock_gettime(self._cpu_clock)
                _gc_watched.add(ident)
                self._gc_start = _gc_seconds(ident, self._cpu_start)
            self._thread = ident
        try:
            return self._job()
        finally:
            # An interruption sent just before this point is delivered here at the latest.
            with self._lock:
                self._done = True
                self.finished = True

    def drop(self) -> None:
        """Its caller left: a job not started yet never starts; one running finishes (its CPU
        is bounded by the budget, and an exception raised into a thread lands wherever it runs,
        garbage-collector callbacks included)."""
        with self._lock:
            if self._thread is None:
                self._done = True

    def interrupt(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            if self._thread is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread), ctypes.py_object(ValidationTimeout)
                )


class DocumentValidator:
    """Validates documents in worker threads within `budget_s`, remembering recent results.

    `limits` run first, alone: they are linear, and the standard rules (some quadratic in the
    document's breadth) only see documents within the limits.
    """

    def __init__(
        self,
        limits: Sequence[type[ASTValidationRule]],
        rules: Sequence[type[ASTValidationRule]] = tuple(specified_rules),
        *,
        budget_s: float,
        hide_suggestions: bool = False,
        cache_size: int = 1024,
    ) -> None:
        self.limits = tuple(limits)
        self.rules = (*rules, MaybeNullValidationRule, OneOfInputValidationRule)
        self.budget_s = budget_s
        self.hide_suggestions = hide_suggestions
        self._cache: OrderedDict[tuple[str, tuple[Any, ...]], list[GraphQLError]] = OrderedDict()
        self._cache_size = cache_size

    def validate_now(
        self,
        schema: GraphQLSchema,
        document: DocumentNode,
        extra: tuple[type[ASTValidationRule], ...] = (),
    ) -> list[GraphQLError]:
        """Validation in the calling thread (what the pool threads run)."""
        errors = validate(schema, document, self.limits)
        if not errors:
            rules = (*self.rules, *extra)
            errors = validate(schema, document, rules, hide_suggestions=self.hide_suggestions)
        return [_explained(error) for error in errors]

    async def validate(
        self,
        schema: GraphQLSchema,
        document: DocumentNode,
        text: str | None,
        extra: tuple[type[ASTValidationRule], ...] = (),
    ) -> list[GraphQLError]:
        """Errors of `document` (`text` is its source, the cache key; None: not cached);
        `extra` rules are added by other extensions (DisableIntrospection)."""
        key = (text, extra)
        if text is not None and (cached := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return cached
        job = _Interruptible(lambda: self.validate_now(schema, document, extra))
        future = asyncio.get_running_loop().run_in_executor(_pool(), job.run)
        try:
            if not await self._within_budget(job, future):
                job.interrupt()
                future.add_done_callback(_consume)
                return [
                    GraphQLError(
                        f"the document took more than {self.budget_s:g} s of CPU to validate",
                        extensions={"code": DocumentRefused.code, "budgetSeconds": self.budget_s},
                    )
                ]
            errors: list[GraphQLError] = future.result()
        except BaseException:
            job.drop()
            future.add_done_callback(_consume)
            raise
        if text is not None:
            self._cache[key] = errors
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return errors

    async def _within_budget(self, job: _Interruptible, future: asyncio.Future[Any]) -> bool:
        """Waits for the job; False once it has used its CPU budget (time spent queued or
        waiting for a busy CPU does not count)."""
        remaining = self.budget_s
        while True:
            done, _ = await asyncio.wait({future}, timeout=remaining)
            if done or job.finished:
                await future
                return True
            used = job.cpu_seconds()
            if used >= self.budget_s:
                return False
            remaining = max(self.budget_s - used, 0.05)


_POOL: ThreadPoolExecutor | None = None
VALIDATION_THREADS = 2  # validation is pure Python: more threads would only share the GIL


def _pool() -> ThreadPoolExecutor:
    """One pool for the process (every schema's validator shares it), made on first use."""
    global _POOL  # noqa: PLW0603 (process-wide, like the default executor)
    if _POOL is None:
        _POOL = ThreadPoolExecutor(VALIDATION_THREADS, thread_name_prefix="graphql-validate")
    return _POOL


def _explained(error: GraphQLError) -> GraphQLError:
    """graphql-core says only "Validation aborted." when a document is too costly to check."""
    if not isinstance(error, ValidationAbortedError) or error.message != "Validation aborted.":
        return error
    return GraphQLError(
        "the document is too complex to validate: too many fields to compare, or fragments "
        "nested too deeply",
        extensions={"code": DocumentRefused.code},
    )


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: an interrupted job's exception is expected


def _unnamed_among_several(document: DocumentNode) -> bool:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    return len(operations) > 1


def document_checks(settings: GraphQLSettings, *, production: bool) -> type[SchemaExtension]:
    """The extension that bounds a document's tokens, refuses an unnamed choice among several
    operations, and validates it with the standard rules plus our limits, off the loop."""
    validator = DocumentValidator(
        [
            limits_rule(
                DocumentLimits(
                    max_depth=settings.max_depth,
                    max_aliases=settings.max_aliases,
                    max_cost=settings.max_cost,
                    max_breadth=settings.max_breadth,
                )
            )
        ],
        bounded_rules(settings.max_merge_comparisons),
        budget_s=settings.validation_timeout_s,
        hide_suggestions=production,
    )
    max_tokens = settings.max_tokens
    standard = frozenset(specified_rules)  # Strawberry's defaults, which `validator` replaces

    class DocumentChecks(SchemaExtension):
        def on_operation(self) -> Any:
            self.execution_context.parse_options["max_tokens"] = max_tokens
            yield

        def on_parse(self) -> Any:
            yield
            ctx = self.execution_context
            document = ctx.graphql_document
            if (
                document is not None
                and ctx._provided_operation_name is None
                and _unnamed_among_several(document)
            ):
                raise DocumentRefused(
                    "the document has several operations: say which to run with operationName"
                )

        async def on_validate(self) -> AsyncIterator[None]:
            ctx = self.execution_context
            if ctx.pre_execution_errors is None and ctx.graphql_document is not None:
                ctx.pre_execution_errors = await validator.validate(
                    ctx.schema._schema,
                    ctx.graphql_document,
                    ctx.query,
                    tuple(rule for rule in ctx.validation_rules if rule not in standard),
                )
            yield

    DocumentChecks.validator = validator  # type: ignore[attr-defined]  # for tests and shutdown
    return DocumentChecks
