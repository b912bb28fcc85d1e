"""The privacy service against real PostgreSQL (row-level security on) and Redis: policies,
purges by retention, erasure of users and tenants (complete, idempotent, resumable), exports."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.auth.credentials import digest
from backend.auth.principal import Principal
from backend.auth.throttle import LoginThrottle
from backend.config import PrivacySettings
from backend.core.models import RunStatus, UserRole
from backend.errors import NotFound, ValidationFailed
from backend.privacy.errors import ErasureRefused
from backend.privacy.schemas import ErasureStatus
from tests.privacy.conftest import Kit, Seeded, backdate, count, new_tenant, owner_rows, seed


async def principal_of(kit: Kit, slug: str, email: str) -> Principal:
    return await kit.auth.principal_for(slug, email)


async def left_of(kit: Kit, seeded: Seeded) -> dict[str, int]:
    """How many of the seeded user's rows and Redis keys are still there."""
    tenant_id, uid = seeded.user.tenant_id, seeded.user.id
    by_id = {
        "conversations": ("conversations", seeded.conversations),
        "messages": ("messages", seeded.messages),
        "runs": ("runs", seeded.runs),
        "documents": ("documents", seeded.documents),
        "ingestion_jobs": ("ingestion_jobs", seeded.ingestion_jobs),
        "vision_jobs": ("vision_jobs", seeded.vision_jobs),
    }
    left = {
        name: await count(
            kit.db, tenant_id, f"SELECT count(*) FROM {table} WHERE id = ANY(:ids)", ids=ids
        )
        for name, (table, ids) in by_id.items()
    }
    left["chunks"] = await count(
        kit.db,
        tenant_id,
        "SELECT count(*) FROM chunks WHERE document_id = ANY(:ids)",
        ids=seeded.documents,
    )
    left["usage_named"] = await count(
        kit.db,
        tenant_id,
        "SELECT count(*) FROM usage_records WHERE id = ANY(:ids) AND user_id IS NOT NULL",
        ids=seeded.usage,
    )
    for name, sql in (
        ("users", "SELECT count(*) FROM users WHERE id = :u"),
        ("api_keys", "SELECT count(*) FROM api_keys WHERE user_id = :u"),
        ("refresh_tokens", "SELECT count(*) FROM refresh_tokens WHERE user_id = :u"),
    ):
        left[name] = await count(kit.db, tenant_id, sql, u=uid)
    streams = 0
    for log, ids in (
        (kit.streams.runs, seeded.runs),
        (kit.streams.ingestion, seeded.ingestion_jobs),
        (kit.streams.vision, seeded.vision_jobs),
    ):
        streams += sum([await log.exists(str(i)) for i in ids])  # type: ignore[attr-defined]
    left["event_streams"] = streams
    left["memory"] = sum(
        [
            await kit.memory.aget_tuple({"configurable": {"thread_id": str(c)}}) is not None
            for c in seeded.conversations
        ]
    )
    api_cache = kit.keys("auth", "apikey", digest(seeded.api_key).hex())
    account = LoginThrottle._account(seeded.tenant_slug, seeded.user.email)  # sign-in throttling
    throttled = [k async for k in kit.redis.scan_iter(match=kit.keys("login", "*", account) + "*")]
    left["redis_credentials"] = int(await kit.redis.exists(api_cache)) + bool(throttled)
    return left


def nothing_left(left: dict[str, int]) -> bool:
    return not any(left.values())


# -- policies ---------------------------------------------------------------------------------


async def test_policy_defaults_changes_and_bad_documents(kit: Kit) -> None:
    tenant, (owner,) = await new_tenant(kit, UserRole.OWNER)
    policy = await kit.service.policy(tenant.id)
    assert policy.retention.messages_days is None  # chat history is kept unless asked
    assert policy.retention.audit_days == 365
    assert policy.store_messages_redacted is False

    changed = await kit.service.update_policy(
        tenant.id,
        {"retention": {"messages_days": 30, "audit_days": None}},
        actor_id=owner.id,
    )
    assert changed.retention.messages_days == 30
    assert changed.retention.audit_days is None  # null: forever, not "the default"
    again = await kit.service.update_policy(
        tenant.id, {"store_messages_redacted": True}, actor_id=owner.id
    )
    assert again.retention.messages_days == 30  # merged, not replaced
    assert again.store_messages_redacted is True
    reset = await kit.service.update_policy(tenant.id, {}, actor_id=owner.id, replace=True)
    assert reset.retention.messages_days is None

    for bad in (
        {"retention": {"messages_days": 0}},
        {"retention": {"messages_days": "soon"}},
        {"retention": {"forever": 1}},
        {"unknown": True},
    ):
        with pytest.raises(ValidationFailed) as failed:
            await kit.service.update_policy(tenant.id, bad, actor_id=owner.id)
        assert failed.value.details["problems"]
    audited = await count(
        kit.db,
        tenant.id,
        "SELECT count(*) FROM audit_events WHERE event = 'privacy.policy_updated'",
    )
    assert audited == 3


async def test_operator_defaults_apply_to_tenants_without_a_policy(kit: Kit) -> None:
    tenant, _ = await new_tenant(kit, UserRole.OWNER)
    kit.service._defaults = kit.service._defaults | {"store_messages_redacted": True}
    kit.service._cache.clear()
    assert (await kit.service.policy(tenant.id)).store_messages_redacted is True


async def test_messages_are_stored_redacted_when_the_policy_says_so(kit: Kit) -> None:
    tenant, (owner,) = await new_tenant(kit, UserRole.OWNER)
    principal = await principal_of(kit, tenant.slug, owner.email)
    sent = "card 4111 1111 1111 1111, mail ada@example.com, order 12345"
    assert await kit.service.stored_message(principal, sent) == sent
    await kit.service.update_policy(tenant.id, {"store_messages_redacted": True}, actor_id=owner.id)
    assert (
        await kit.service.stored_message(principal, sent)
        == "card [CARD], mail [EMAIL], order 12345"
    )


# -- purges -----------------------------------------------------------------------------------


async def test_purge_deletes_only_what_is_past_retention(kit: Kit) -> None:
    tenant, (owner, member) = await new_tenant(kit, UserRole.OWNER, UserRole.MEMBER)
    old = await seed(kit, tenant, member, messages=7, tag="old")
    for table in ("messages", "runs", "conversations", "documents", "ingestion_jobs"):
        await backdate(kit.db, tenant.id, table, 40)
    await backdate(kit.db, tenant.id, "vision_jobs", 40)
    await backdate(kit.db, tenant.id, "audit_events", 400)
    new = await seed(kit, tenant, member, messages=2, tag="new")
    await kit.service.update_policy(
        tenant.id,
        {"retention": {"messages_days": 30, "documents_days": 30, "vision_days": 30}},
        actor_id=owner.id,
    )
    zebra = "SELECT ndoc FROM lexeme_stats WHERE lexeme = 'zebra'"
    assert await count(kit.db, tenant.id, zebra) == 4  # in two chunks of each document

    removed = await kit.service.purge(tenant.id)

    assert removed.messages == 7
    assert removed.runs == 1
    assert removed.conversations == 1
    assert removed.documents == 1
    assert removed.ingestion_jobs == 1
    assert removed.vision_jobs == 1
    assert removed.audit_events >= 2
    assert removed.event_streams == 3  # the old run's and jobs' streams (events: 1 day)
    left_old = await left_of(kit, old)
    assert {k: v for k, v in left_old.items() if v} == {
        "users": 1,
        "usage_named": 1,  # usage is not subject to retention
        "api_keys": 2,  # nor are credentials
        "redis_credentials": 2,
    }
    left_new = await left_of(kit, new)
    assert left_new["messages"] == 2
    assert left_new["documents"] == 1
    assert left_new["memory"] == 1
    assert left_new["event_streams"] == 3
    # the document's words left the tenant's word frequencies with it
    assert await count(kit.db, tenant.id, zebra) == 2
    # the purge is audited; a second one finds nothing
    assert (
        await count(
            kit.db, tenant.id, "SELECT count(*) FROM audit_events WHERE event = 'privacy.purged'"
        )
        == 1
    )
    assert (await kit.service.purge(tenant.id)).as_dict() == {}


async def test_events_retention_walks_each_window_once(kit: Kit) -> None:
    tenant, (_, member) = await new_tenant(kit, UserRole.OWNER, UserRole.MEMBER)
    first = await seed(kit, tenant, member, tag="a")
    await backdate(kit.db, tenant.id, "runs", 3)
    removed = await kit.service.purge(tenant.id)
    assert removed.event_streams == 1  # the run's; the jobs are a day old at most
    assert (await left_of(kit, first))["messages"] == 3  # messages are kept forever
    # a stream of an old run written again later is not looked at twice (the watermark)
    await kit.streams.runs.append(str(first.runs[0]), "Late")  # type: ignore[attr-defined]
    assert (await kit.service.purge(tenant.id)).event_streams == 0


async def test_unscoped_audit_events_are_purged_by_their_own_retention(
    kit: Kit, db_connection: AsyncConnection
) -> None:
    await db_connection.execute(
        text(
            "INSERT INTO audit_events (tenant_id, event, outcome, details, created_at) VALUES "
            "(NULL, 'login', 'failure', '{\"email\": \"old@x.example\"}', now() - interval "
            "'100 days'), (NULL, 'login', 'failure', '{}', now())"
        )
    )
    unscoped = "SELECT count(*) FROM audit_events WHERE tenant_id IS NULL"
    ((before,),) = await owner_rows(db_connection, unscoped)
    removed = await kit.service.purge()
    ((after,),) = await owner_rows(db_connection, unscoped)
    assert removed.audit_events >= 1
    assert after == before - removed.audit_events
    ((recent,),) = await owner_rows(
        db_connection, unscoped + " AND created_at > now() - interval '1 day'"
    )
    assert recent >= 1


# -- erasure ----------------------------------------------------------------------------------


async def test_erasing_a_user_leaves_nothing_of_them_and_keeps_colleagues(
    kit: Kit, db_connection: AsyncConnection
) -> None:
    tenant, (owner, member, colleague) = await new_tenant(
        kit, UserRole.OWNER, UserRole.MEMBER, UserRole.MEMBER
    )
    subject = await seed(kit, tenant, member, messages=5, tag="x")
    kept = await seed(kit, tenant, colleague, tag="y")
    admin = await principal_of(kit, tenant.slug, owner.email)

    erasure = await kit.service.erase_user(admin, tenant.id, member.id)

    assert erasure.status is ErasureStatus.COMPLETED
    assert erasure.subject.startswith("erased-user-")
    assert member.email not in erasure.subject
    assert erasure.removed.messages == 5
    assert erasure.removed.documents == 1
    assert erasure.removed.usage_records_anonymised == 1
    assert nothing_left(await left_of(kit, subject)), await left_of(kit, subject)
    kept_left = await left_of(kit, kept)
    assert kept_left["messages"] == 3
    assert kept_left["memory"] == 1
    assert kept_left["event_streams"] == 3
    # usage stays, without the person
    assert (
        await count(kit.db, tenant.id, "SELECT count(*) FROM usage_records WHERE user_id IS NULL")
        == 1
    )
    # the audit log keeps what happened, with the pseudonym instead of the person
    rows = await owner_rows(
        db_connection,
        "SELECT event, actor_id, details::text FROM audit_events WHERE tenant_id = :t",
        t=tenant.id,
    )
    assert rows
    for _, actor, details in rows:
        assert actor != member.id
        assert member.email not in details
        assert str(member.id) not in details
    events = [r[0] for r in rows]
    assert "privacy.user_erasure_requested" in events
    assert "privacy.user_erased" in events
    assert sum(erasure.subject in r[2] for r in rows) >= 3
    # idempotent: asking again is answered from the audit log
    again = await kit.service.erase_user(admin, tenant.id, member.id)
    assert again.status is ErasureStatus.COMPLETED
    assert again.subject == erasure.subject
    with pytest.raises(NotFound):
        await kit.service.erase_user(admin, tenant.id, uuid.uuid4())


async def test_owners_are_erased_only_by_owners_and_never_the_last(kit: Kit) -> None:
    tenant, (owner, admin_user, second_owner) = await new_tenant(
        kit, UserRole.OWNER, UserRole.ADMIN, UserRole.OWNER
    )
    admin = await principal_of(kit, tenant.slug, admin_user.email)
    with pytest.raises(ErasureRefused):
        await kit.service.erase_user(admin, tenant.id, owner.id)
    boss = await principal_of(kit, tenant.slug, owner.email)
    assert (
        await kit.service.erase_user(boss, tenant.id, second_owner.id)
    ).status is ErasureStatus.COMPLETED
    with pytest.raises(ErasureRefused):  # the last owner: erase the tenant instead
        await kit.service.erase_user(boss, tenant.id, owner.id)
    other, (stranger,) = await new_tenant(kit, UserRole.OWNER)
    with pytest.raises(NotFound):  # another tenant's user does not exist for this admin
        await kit.service.erase_user(boss, other.id, stranger.id)


async def test_an_interrupted_erasure_is_finished_by_the_next_purge(kit: Kit) -> None:
    tenant, (owner, member) = await new_tenant(kit, UserRole.OWNER, UserRole.MEMBER)
    subject = await seed(kit, tenant, member, tag="z")
    async with kit.db.session(tenant.id) as session:
        await session.execute(
            text("UPDATE runs SET status = 'running' WHERE id = :r"), {"r": subject.runs[0]}
        )
    kit.settings.run_stop_timeout_s = 0.3  # no run service here: the run will not stop
    stopped: list[uuid.UUID] = []

    async def stop(run_id: uuid.UUID) -> None:
        stopped.append(run_id)

    kit.service.stop_run = stop
    admin = await principal_of(kit, tenant.slug, owner.email)

    pending = await kit.service.erase_user(admin, tenant.id, member.id)

    assert pending.status is ErasureStatus.PENDING
    assert stopped == subject.runs  # asked to stop, once
    left = await left_of(kit, subject)
    assert left["users"] == 1  # marked, disabled, nothing deleted yet
    assert left["messages"] == 3
    assert left["redis_credentials"] == 0  # the cached key is no longer trusted
    async with kit.db.session(tenant.id) as session:
        row = (
            await session.execute(
                text("SELECT is_active, erasure_requested_at IS NOT NULL FROM users WHERE id=:u"),
                {"u": member.id},
            )
        ).one()
        revoked = await session.scalar(
            text("SELECT bool_and(revoked_at IS NOT NULL) FROM api_keys WHERE user_id = :u"),
            {"u": member.id},
        )
    assert tuple(row) == (False, True)
    assert revoked is True

    async with kit.db.session(tenant.id) as session:  # the run ends (its replica failed it)
        await session.execute(
            text("UPDATE runs SET status = :s WHERE id = :r"),
            {"s": RunStatus.FAILED.value, "r": subject.runs[0]},
        )
    await kit.service.purge(tenant.id)
    assert nothing_left(await left_of(kit, subject))
    again = await kit.service.erase_user(admin, tenant.id, member.id)
    assert again.status is ErasureStatus.COMPLETED


async def test_a_run_left_for_dead_does_not_hold_up_an_erasure(kit: Kit) -> None:
    tenant, (owner, member) = await new_tenant(kit, UserRole.OWNER, UserRole.MEMBER)
    subject = await seed(kit, tenant, member, tag="dead")
    async with kit.db.session(tenant.id) as session:  # queued two hours ago, never started
        await session.execute(
            text(
                "UPDATE runs SET status = 'queued', updated_at = now() - interval '2 hours' "
                "WHERE id = :r"
            ),
            {"r": subject.runs[0]},
        )
    kit.settings.run_stop_timeout_s = 0.3
    admin = await principal_of(kit, tenant.slug, owner.email)
    erasure = await kit.service.erase_user(admin, tenant.id, member.id)
    assert erasure.status is ErasureStatus.COMPLETED
    assert nothing_left(await left_of(kit, subject))


async def test_erasing_a_tenant_removes_everything_in_it(
    kit: Kit, db_connection: AsyncConnection
) -> None:
    tenant, (owner, member) = await new_tenant(kit, UserRole.OWNER, UserRole.MEMBER)
    seeded = [await seed(kit, tenant, u, tag=u.role.value) for u in (owner, member)]
    other, (neighbour,) = await new_tenant(kit, UserRole.OWNER)
    kept = await seed(kit, other, neighbour, tag="kept")

    erasure = await kit.service.erase_tenant(None, tenant.id, via="test")

    assert erasure.status is ErasureStatus.COMPLETED
    assert erasure.removed.users == 2
    for table in (
        "users",
        "conversations",
        "messages",
        "runs",
        "documents",
        "chunks",
        "lexeme_stats",
        "ingestion_jobs",
        "vision_jobs",
        "usage_records",
        "audit_events",
        "api_keys",
        "refresh_tokens",
        "privacy_policies",
    ):
        ((left,),) = await owner_rows(
            db_connection, f"SELECT count(*) FROM {table} WHERE tenant_id = :t", t=tenant.id
        )
        assert left == 0, table
    assert (
        await db_connection.execute(
            text("SELECT count(*) FROM tenants WHERE id = :t"), {"t": tenant.id}
        )
    ).scalar_one() == 0
    for one in seeded:
        left = await left_of(kit, one)
        assert left["event_streams"] == left["memory"] == left["redis_credentials"] == 0
    assert (await left_of(kit, kept))["messages"] == 3
    ((recorded,),) = await owner_rows(
        db_connection,
        "SELECT details FROM audit_events WHERE event = 'privacy.tenant_erased' "
        "AND details->>'tenant' = :t",
        t=str(tenant.id),
    )
    assert recorded["slug"] == tenant.slug
    assert recorded["subject"] == erasure.subject


async def test_only_platform_operators_erase_tenants(kit: Kit) -> None:
    operators, (root,) = await new_tenant(kit, UserRole.OWNER)
    tenant, (owner,) = await new_tenant(kit, UserRole.OWNER)
    root_principal = await principal_of(kit, operators.slug, root.email)
    owner_principal = await principal_of(kit, tenant.slug, owner.email)
    from backend.privacy.errors import NotOperator

    with pytest.raises(NotFound):  # operators unset: no one is one
        await kit.service.erase_tenant(root_principal, tenant.id)
    kit.settings.operator_tenant = operators.slug
    with pytest.raises(NotOperator):  # an owner cannot erase their own tenant over the API
        await kit.service.erase_tenant(owner_principal, tenant.id)
    with pytest.raises(ErasureRefused):
        await kit.service.erase_tenant(root_principal, operators.id)
    done = await kit.service.erase_tenant(root_principal, tenant.id)
    assert done.status is ErasureStatus.COMPLETED
    again = await kit.service.erase_tenant(root_principal, tenant.id)  # idempotent
    assert again.status is ErasureStatus.COMPLETED
    assert again.subject == done.subject


# -- exports ----------------------------------------------------------------------------------


async def test_an_export_holds_the_users_data_and_no_secrets(kit: Kit) -> None:
    tenant, (owner, member, colleague) = await new_tenant(
        kit, UserRole.OWNER, UserRole.MEMBER, UserRole.MEMBER
    )
    mine = await seed(kit, tenant, member, messages=5, tag="mine")
    await seed(kit, tenant, colleague, tag="theirs")

    pieces = await kit.service.export_user(tenant.id, member.id, actor_id=owner.id)
    raw = b"".join([piece async for piece in pieces])

    archive = json.loads(raw)
    assert archive["format"] == "sightline.export/1"
    assert archive["user"]["email"] == member.email
    assert "password_hash" not in archive["user"]
    (conversation,) = archive["conversations"]
    assert [m["seq"] for m in conversation["messages"]] == [1, 2, 3, 4, 5]  # across pages
    assert conversation["messages"][0]["content"].startswith("message 0 of " + member.email)
    (document,) = archive["documents"]
    assert [c["text"] for c in document["chunks"]] == ["zebra quartz mine", "zebra lantern mine"]
    assert "embedding" not in document["chunks"][0]
    assert len(archive["api_keys"]) == 1
    assert "secret_hash" not in archive["api_keys"][0]
    assert len(archive["vision_jobs"]) == 1
    assert len(archive["usage"]) == 1
    assert any(e["event"] == "login" for e in archive["audit_events"])
    assert b"theirs" not in raw
    assert mine.api_key.encode() not in raw
    assert (
        await count(
            kit.db, tenant.id, "SELECT count(*) FROM audit_events WHERE event = 'privacy.exported'"
        )
        == 1
    )


async def test_exports_are_for_the_user_or_an_admin_once(kit: Kit) -> None:
    from backend.privacy.errors import ExportGone

    tenant, (owner, member, colleague) = await new_tenant(
        kit, UserRole.OWNER, UserRole.MEMBER, UserRole.MEMBER
    )
    me = await principal_of(kit, tenant.slug, member.email)
    with pytest.raises(NotFound):
        await kit.service.request_export(me, colleague.id)
    ticket = await kit.service.request_export(me, member.id)
    admin = await principal_of(kit, tenant.slug, owner.email)
    with pytest.raises(ExportGone):  # only its requester downloads it
        await kit.service.open_export(admin, ticket.id)
    body = b"".join([p async for p in await kit.service.open_export(me, ticket.id)])
    assert json.loads(body)["user"]["id"] == str(member.id)
    with pytest.raises(ExportGone):  # once
        await kit.service.open_export(me, ticket.id)
    assert (await kit.service.request_export(admin, colleague.id)).user_id == colleague.id


async def test_settings_validate() -> None:
    assert PrivacySettings(unscoped_audit_days="").unscoped_audit_days is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="purge_batch_size"):
        PrivacySettings(purge_batch_size=0)
