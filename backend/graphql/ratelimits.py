"""Every operation takes from its caller's allowance; the remainder is reported in extensions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from graphql import GraphQLError
from strawberry.extensions import SchemaExtension

from backend.errors import expected_error
from backend.graphql.extensions import operation_type


class RateLimits(SchemaExtension):
    """Per principal (or client IP when anonymous) and operation class: query, mutation,
    subscription. Costlier classes (chat runs, vision jobs, ingestion) are taken by the
    services that start them. Taken before validation: a client sending documents that fail
    validation spends its allowance like any other."""

    async def on_validate(self) -> AsyncIterator[None]:
        ctx = self.execution_context
        kind = operation_type(ctx)
        context = ctx.context
        if kind != "unknown":
            principal = context.principal
            plan = principal.plan if principal else context.state.settings.limits.default_plan
            try:
                decision = await context.services.limiter.enforce(context.rate_subject, plan, kind)
            except Exception as exc:
                # A refusal (RATE_LIMITED, or Redis down: SERVICE_UNAVAILABLE) is the result of
                # validation, which then does not run: raised from this hook it would end a
                # subscription's stream with no answer at all.
                typed = expected_error(exc)
                if typed is None:
                    raise
                ctx.pre_execution_errors = [GraphQLError(typed.message, original_error=typed)]
                yield
                return
            if decision is not None:
                context.rate_limit = {
                    "class": kind,
                    "limit": decision.limit,
                    "remaining": decision.remaining,
                    "resetAfter": round(decision.reset_after_s, 3),
                }
        yield

    def get_results(self) -> dict[str, Any]:
        rate_limit = getattr(self.execution_context.context, "rate_limit", None)
        return {"rateLimit": rate_limit} if rate_limit else {}
