"""Guardrail policies in the schema: the tenant's effective policy, admin edits, and a dry run
of the input rails for trying a policy out."""

from __future__ import annotations

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.errors import AppError, ValidationFailed
from backend.graphql.context import Context
from backend.graphql.permissions import HasScope
from backend.guardrails.service import GuardrailService

ADMIN = [HasScope(Scope.ADMIN)]


class GuardrailsOff(AppError):
    code = "GUARDRAILS_DISABLED"
    status = 409


def _service(info: Info[Context, None]) -> GuardrailService:
    service = info.context.services.guardrails
    if service is None:
        raise GuardrailsOff("the guardrails are off (SIGHTLINE_GUARDRAILS_ENABLED=false)")
    return service


@strawberry.type(description="The rails a tenant runs under: the defaults merged with its edits.")
class GuardrailPolicy:
    policy: JSON = strawberry.field(description="Every rail with its settings (see the README).")


@strawberry.type(description="One rail's decision.")
class GuardrailDecision:
    rail: str
    action: str
    reason: str


@strawberry.type(description="What the input rails would do with a message (nothing is stored).")
class GuardrailCheck:
    blocked: bool
    text: str = strawberry.field(description="What the model would get (redacted).")
    decisions: list[GuardrailDecision]


@strawberry.type
class GuardrailQuery:
    @strawberry.field(permission_classes=ADMIN)
    async def guardrail_policy(self, info: Info[Context, None]) -> GuardrailPolicy:
        policy = await _service(info).policy(info.context.require_principal())
        return GuardrailPolicy(policy=policy.model_dump(mode="json"))

    @strawberry.field(
        permission_classes=ADMIN,
        description="Runs the tenant's input rails on `text` as on a chat message (to try a "
        "policy out); decisions are counted and audited like real ones.",
    )
    async def guardrail_check(self, info: Info[Context, None], text: str) -> GuardrailCheck:
        limit = info.context.state.settings.chat.max_message_chars
        if len(text) > limit:
            raise ValidationFailed(f"text over {limit} characters", field="text")
        verdict = await _service(info).check_input(info.context.require_principal(), text, [])
        return GuardrailCheck(
            blocked=verdict.blocked,
            text=verdict.safe_reply if verdict.blocked else verdict.text,
            decisions=[
                GuardrailDecision(rail=d.rail, action=d.action.value, reason=d.reason)
                for d in verdict.decisions
            ],
        )


@strawberry.type
class GuardrailMutation:
    @strawberry.mutation(
        permission_classes=ADMIN,
        description="Changes the tenant's policy: `change` is merged into what is stored "
        '(`{"pii": {"kinds": ["email"]}}`), or replaces it with `replace: true` (`{}` restores '
        "the defaults). Invalid documents fail with BAD_USER_INPUT listing each problem.",
    )
    async def update_guardrail_policy(
        self, info: Info[Context, None], change: JSON, replace: bool = False
    ) -> GuardrailPolicy:
        if not isinstance(change, dict):
            raise ValidationFailed("change must be a JSON object", field="change")
        policy = await _service(info).update_policy(
            info.context.require_principal(), change, replace=replace
        )
        return GuardrailPolicy(policy=policy.model_dump(mode="json"))
