"""Data protection in the schema: a tenant's policy (retention, messages stored redacted),
purging now, erasing a user or a tenant, and exporting a user's data."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import strawberry
from strawberry.types import Info

from backend.auth.scopes import Scope
from backend.graphql.context import Context
from backend.graphql.ids import parse_id
from backend.graphql.permissions import HasScope, IsAuthenticated
from backend.privacy import schemas
from backend.privacy.endpoints import EXPORTS_PATH
from backend.privacy.service import PrivacyService

ADMIN = [HasScope(Scope.ADMIN)]

ErasureStatus = strawberry.enum(schemas.ErasureStatus, name="ErasureStatus")


def _service(info: Info[Context, None]) -> PrivacyService:
    service = info.context.services.privacy
    assert service is not None  # every app with services has one
    return service


@strawberry.type(
    description="Days each kind of data is kept after it was created (documents: "
    "last ingested); null keeps it forever."
)
class Retention:
    messages_days: int | None = strawberry.field(description="Messages and their runs.")
    documents_days: int | None = strawberry.field(description="Documents and ingestion jobs.")
    vision_days: int | None = strawberry.field(description="Image analysis jobs and results.")
    events_days: int | None = strawberry.field(description="Replayable event streams.")
    audit_days: int | None = strawberry.field(description="The tenant's audit events.")


@strawberry.type(name="PrivacyPolicy", description="A tenant's data protection policy.")
class PrivacyPolicyType:
    retention: Retention
    store_messages_redacted: bool = strawberry.field(
        description="Users' messages are stored with personal data replaced, as the model "
        "gets them."
    )

    @classmethod
    def of(cls, policy: schemas.PrivacyPolicy) -> PrivacyPolicyType:
        return cls(
            retention=Retention(**policy.retention.model_dump()),
            store_messages_redacted=policy.store_messages_redacted,
        )


@strawberry.input(
    description="Retention to change: a field left out stays as it is; null "
    "keeps that kind forever."
)
class RetentionInput:
    messages_days: int | None = strawberry.UNSET
    documents_days: int | None = strawberry.UNSET
    vision_days: int | None = strawberry.UNSET
    events_days: int | None = strawberry.UNSET
    audit_days: int | None = strawberry.UNSET

    def change(self) -> dict[str, Any]:
        names = ("messages_days", "documents_days", "vision_days", "events_days", "audit_days")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not strawberry.UNSET}


@strawberry.type(
    description="What was removed (or, for pseudonymised and anonymised, kept without the person)."
)
class Removed:
    conversations: int
    messages: int
    runs: int
    documents: int
    ingestion_jobs: int
    vision_jobs: int
    event_streams: int
    memory_threads: int
    audit_events: int
    audit_events_pseudonymised: int
    usage_records_anonymised: int
    users: int

    @classmethod
    def of(cls, removed: schemas.Removed) -> Removed:
        return cls(**{f.name: getattr(removed, f.name) for f in fields(removed)})


@strawberry.type(
    description="An erasure: COMPLETED, or PENDING while it goes on in the "
    "background (asking again reports it; it also resumes after a restart)."
)
class Erasure:
    subject: str = strawberry.field(description="The pseudonym the audit log keeps.")
    status: ErasureStatus  # type: ignore[valid-type]
    removed: Removed


@strawberry.type(
    description="A data export to download once, with the same credential, "
    "before it expires: GET `url` answers the JSON archive."
)
class DataExport:
    url: str
    expires_at: datetime


def _erasure(result: schemas.Erasure) -> Erasure:
    return Erasure(subject=result.subject, status=result.status, removed=Removed.of(result.removed))


@strawberry.type
class PrivacyQuery:
    @strawberry.field(permission_classes=ADMIN)
    async def privacy_policy(self, info: Info[Context, None]) -> PrivacyPolicyType:
        policy = await _service(info).policy(info.context.require_principal().tenant_id)
        return PrivacyPolicyType.of(policy)


@strawberry.type
class PrivacyMutation:
    @strawberry.mutation(
        permission_classes=ADMIN,
        description="Changes the tenant's data protection policy (audited); `reset: true` "
        "first goes back to the server's defaults.",
    )
    async def update_privacy_policy(
        self,
        info: Info[Context, None],
        retention: RetentionInput | None = None,
        store_messages_redacted: bool | None = None,
        reset: bool = False,
    ) -> PrivacyPolicyType:
        principal = info.context.require_principal()
        change: dict[str, Any] = {}
        if retention is not None and retention.change():
            change["retention"] = retention.change()
        if store_messages_redacted is not None:
            change["store_messages_redacted"] = store_messages_redacted
        policy = await _service(info).update_policy(
            principal.tenant_id, change, actor_id=principal.user_id, replace=reset
        )
        return PrivacyPolicyType.of(policy)

    @strawberry.mutation(
        permission_classes=ADMIN,
        description="Deletes the tenant's data that is past its retention now (the server "
        "also does it periodically).",
    )
    async def purge_expired_data(self, info: Info[Context, None]) -> Removed:
        principal = info.context.require_principal()
        return Removed.of(await _service(info).purge(principal.tenant_id))

    @strawberry.mutation(
        permission_classes=ADMIN,
        description="Erases a user of the tenant: conversations, messages, agent memory, run "
        "event streams, documents they ingested, vision jobs, credentials. Usage is kept "
        "without them, audit events under a pseudonym. Idempotent; only an owner erases an "
        "owner, and never the last one.",
    )
    async def erase_user(self, info: Info[Context, None], user_id: strawberry.ID) -> Erasure:
        principal = info.context.require_principal()
        result = await _service(info).erase_user(
            principal, principal.tenant_id, parse_id(user_id, "userId")
        )
        return _erasure(result)

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Erases a tenant and all its data. Platform operators only (owners of the "
        "server's operator tenant); idempotent.",
    )
    async def erase_tenant(self, info: Info[Context, None], tenant_id: strawberry.ID) -> Erasure:
        result = await _service(info).erase_tenant(
            info.context.require_principal(), parse_id(tenant_id, "tenantId")
        )
        return _erasure(result)

    @strawberry.mutation(
        permission_classes=[IsAuthenticated],
        description="Prepares an export of a user's data (the caller's own, or any user's of "
        "the tenant for an admin) as a JSON archive to download.",
    )
    async def export_user_data(
        self, info: Info[Context, None], user_id: strawberry.ID
    ) -> DataExport:
        ticket = await _service(info).request_export(
            info.context.require_principal(), parse_id(user_id, "userId")
        )
        return DataExport(
            url=f"{EXPORTS_PATH}/{ticket.id}",
            expires_at=datetime.fromtimestamp(ticket.expires_at, UTC),
        )
