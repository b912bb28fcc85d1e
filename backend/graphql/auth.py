"""Identity in the schema: me, sessions for the demo UI, API keys, users, audit, usage."""

from __future__ import annotations

from datetime import date, datetime
from enum import Enum

import strawberry
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.core import models
from backend.errors import ValidationFailed
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import HasScope, IsAuthenticated
from backend.limits.usage import usage_by_day

Role = strawberry.enum(models.UserRole, name="Role")
UserKind = strawberry.enum(models.UserKind, name="UserKind")


@strawberry.type(name="User")
class UserType:
    id: strawberry.ID
    email: str
    display_name: str
    role: Role  # type: ignore[valid-type]
    kind: UserKind  # type: ignore[valid-type]
    is_active: bool
    created_at: datetime

    @classmethod
    def of(cls, user: models.User) -> UserType:
        return cls(
            id=strawberry.ID(str(user.id)),
            email=user.email,
            display_name=user.display_name,
            role=user.role,
            kind=user.kind,
            is_active=user.is_active,
            created_at=user.created_at,
        )


@strawberry.type(name="ApiKey", description="An API key; its secret is shown once, at creation.")
class ApiKeyType:
    id: strawberry.ID
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: models.ApiKey) -> ApiKeyType:
        return cls(
            id=strawberry.ID(str(key.id)),
            name=key.name,
            prefix=key.prefix,
            scopes=list(key.scopes),
            created_at=key.created_at,
            expires_at=key.expires_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
        )


@strawberry.type
class CreatedApiKey:
    api_key: ApiKeyType
    secret: str = strawberry.field(description="The whole key. Store it now: it is not kept.")


@strawberry.type
class InvitedUser:
    user: UserType
    temporary_password: str = strawberry.field(description="Hand it over; shown only once.")


@strawberry.type
class Me:
    user_id: strawberry.ID
    tenant_id: strawberry.ID
    role: Role  # type: ignore[valid-type]
    scopes: list[str]
    credential: str
    plan: str


@strawberry.type
class AuthPayload:
    access_token: str
    token_type: str
    expires_in: int
    scope: str
    refresh_token: str | None


@strawberry.type(name="AuditEvent")
class AuditEventType:
    id: strawberry.ID
    event: str
    outcome: str
    actor_id: strawberry.ID | None
    ip: str | None
    details: strawberry.scalars.JSON
    created_at: datetime


@strawberry.type
class UsageDay:
    day: date
    resource: str
    amount: float
    cost: float
    model: str | None = strawberry.field(
        default=None, description="With byModel: the model that consumed it (null: before 0014)."
    )
    version: str | None = strawberry.field(default=None, description="With byModel: its version.")
    kind: str | None = strawberry.field(
        default=None, description="With byModel: chat, vision or embedding."
    )


@strawberry.enum
class UsageScope(Enum):
    TENANT = "tenant"
    ME = "me"


@strawberry.type
class AuthQuery:
    @strawberry.field(permission_classes=[IsAuthenticated], description="Who is calling.")
    def me(self, info: Info[Context, None]) -> Me:
        principal = info.context.require_principal()
        return Me(
            user_id=strawberry.ID(str(principal.user_id)),
            tenant_id=strawberry.ID(str(principal.tenant_id)),
            role=principal.role,
            scopes=sorted(principal.scopes),
            credential=principal.credential.value,
            plan=principal.plan,
        )

    @strawberry.field(permission_classes=[HasScope(Scope.KEYS)])
    async def api_keys(
        self, info: Info[Context, None], all_users: bool = False
    ) -> list[ApiKeyType]:
        principal = info.context.require_principal()
        if all_users and not principal.has(Scope.ADMIN):
            all_users = False  # others' keys need the admin scope; own keys are always listed
        keys = await info.context.services.auth.api_keys(principal, all_users)
        return [ApiKeyType.of(key) for key in keys]

    @strawberry.field(permission_classes=[HasScope(Scope.ADMIN)])
    async def users(self, info: Info[Context, None]) -> list[UserType]:
        users = await info.context.services.auth.list_users(info.context.require_principal())
        return [UserType.of(user) for user in users]

    @strawberry.field(
        permission_classes=[HasScope(Scope.ADMIN)],
        description="Security events of the tenant, newest first.",
    )
    async def audit_events(
        self,
        info: Info[Context, None],
        first: int = 50,
        event: str | None = None,
        before: strawberry.ID | None = None,
    ) -> list[AuditEventType]:
        before_id = None
        if before is not None:
            try:
                before_id = int(before)
            except ValueError:
                before_id = -1
            if not 0 < before_id < 2**63:  # ids are positive bigints
                raise ValidationFailed("before is not a valid id", field="before")
        events = await info.context.services.auth.audit_events(
            info.context.require_principal(), first, event, before_id
        )
        return [
            AuditEventType(
                id=strawberry.ID(str(e.id)),
                event=e.event,
                outcome=e.outcome,
                actor_id=strawberry.ID(str(e.actor_id)) if e.actor_id else None,
                ip=e.ip,
                details=e.details,
                created_at=e.created_at,
            )
            for e in events
        ]

    @strawberry.field(
        permission_classes=[HasScope(Scope.USAGE)],
        description="Settled LLM tokens and compute seconds per day, with their cost; "
        "byModel: per model, version and kind (chat, vision, embedding) too.",
    )
    async def usage(
        self,
        info: Info[Context, None],
        days: int = 30,
        scope: UsageScope = UsageScope.TENANT,
        by_model: bool = False,
    ) -> list[UsageDay]:
        if not 1 <= days <= 366:
            raise ValidationFailed("days must be 1 to 366", field="days")
        principal = info.context.require_principal()
        async with info.context.unit_of_work() as session:
            rows = await usage_by_day(
                session,
                days,
                principal.user_id if scope is UsageScope.ME else None,
                by_model=by_model,
            )
        return [
            UsageDay(
                day=r.day,
                resource=r.resource,
                amount=float(r.amount),
                cost=float(r.cost),
                model=r.model,
                version=r.version,
                kind=r.kind,
            )
            for r in rows
        ]


@strawberry.type
class AuthMutation:
    @strawberry.mutation(description="Password sign-in for first-party apps (the demo UI).")
    async def login(
        self, info: Info[Context, None], tenant: str, email: str, password: str
    ) -> AuthPayload:
        result = await info.context.services.auth.password_grant(
            tenant, email, password, None, info.context.client_ip
        )
        return AuthPayload(
            access_token=result.access_token,
            token_type=result.token_type,
            expires_in=result.expires_in,
            scope=result.scope,
            refresh_token=result.refresh_token,
        )

    @strawberry.mutation(description="Ends the session of a refresh token (and its family).")
    async def logout(self, info: Info[Context, None], refresh_token: str) -> bool:
        await info.context.services.auth.revoke_refresh(refresh_token)
        return True

    @strawberry.mutation(permission_classes=[HasScope(Scope.KEYS)])
    async def create_api_key(
        self,
        info: Info[Context, None],
        name: str,
        scopes: list[str] | None = None,
        expires_in_days: int | None = None,
    ) -> CreatedApiKey:
        created = await info.context.services.auth.create_api_key(
            info.context.require_principal(), name, scopes, expires_in_days
        )
        return CreatedApiKey(api_key=ApiKeyType.of(created.key), secret=created.secret)

    @strawberry.mutation(permission_classes=[HasScope(Scope.KEYS)])
    async def revoke_api_key(self, info: Info[Context, None], id: strawberry.ID) -> ApiKeyType:
        key = await info.context.services.auth.revoke_api_key(
            info.context.require_principal(), parse_id(id, "id")
        )
        return ApiKeyType.of(key)

    @strawberry.mutation(permission_classes=[HasScope(Scope.ADMIN)])
    async def invite_user(
        self,
        info: Info[Context, None],
        email: str,
        role: Role = models.UserRole.MEMBER,  # type: ignore[valid-type]
        display_name: str = "",
    ) -> InvitedUser:
        user, password = await info.context.services.auth.invite_user(
            info.context.require_principal(), email, role, display_name
        )
        return InvitedUser(user=UserType.of(user), temporary_password=password)

    @strawberry.mutation(
        permission_classes=[HasScope(Scope.ADMIN)],
        description="Gives a user another role; their signed-in sessions refresh to get it.",
    )
    async def set_user_role(
        self, info: Info[Context, None], user_id: strawberry.ID, role: Role
    ) -> UserType:  # type: ignore[valid-type]
        user = await info.context.services.auth.set_role(
            info.context.require_principal(), parse_id(user_id, "userId"), role
        )
        return UserType.of(user)

    @strawberry.mutation(
        permission_classes=[HasScope(Scope.ADMIN)],
        description="Disables a user (their tokens, API keys and open streams end at once) "
        "or enables them again (they sign in anew).",
    )
    async def set_user_active(
        self, info: Info[Context, None], user_id: strawberry.ID, active: bool
    ) -> UserType:
        user = await info.context.services.auth.set_active(
            info.context.require_principal(), parse_id(user_id, "userId"), active
        )
        return UserType.of(user)
