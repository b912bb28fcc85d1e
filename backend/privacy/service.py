"""Data protection: each tenant's policy (retention per kind of data, messages stored redacted),
purges of what is past retention, erasure of a user or a whole tenant, and exports of a user's
data as a JSON archive. No SQL here (see the repository), no web framework.

Every delete runs in bounded batches, one short transaction each. Erasures are idempotent and
resumable: the subject is first marked (disabled, credentials revoked, `erasure_requested_at`
set) in one transaction, then removed batch by batch, Redis keys before the rows that name
them, so a crash at any point leaves a marked subject that the next purge pass (on any replica)
or the same request again finishes. A lease in Redis keeps two replicas off the same subject.
Requests and outcomes are audited with a pseudonym (an HMAC of the subject's id), never an
e-mail address.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.audit import Outcome, record
from backend.auth.principal import Principal
from backend.auth.scopes import Scope
from backend.auth.service import AuthService
from backend.config import PrivacySettings
from backend.core.db import Database
from backend.core.models import (
    ApiKey,
    AuditEvent,
    Chunk,
    Conversation,
    Document,
    IngestionJob,
    Message,
    OAuthClient,
    RefreshToken,
    Run,
    Tenant,
    UsageRecord,
    User,
    UserRole,
    VisionJob,
)
from backend.core.redis import KeySpace
from backend.core.tasks import drain
from backend.errors import NotFound, ValidationFailed
from backend.guardrails.pii import find_pii, redact
from backend.guardrails.policy import merge
from backend.knowledge.service import remove_document
from backend.privacy import repository as repo
from backend.privacy._archive import archive
from backend.privacy.errors import ErasureRefused, ExportGone, NotOperator
from backend.privacy.schemas import (
    DataKind,
    Erasure,
    ErasureStatus,
    ExportTicket,
    PrivacyPolicy,
    Removed,
)

log = logging.getLogger(__name__)

LEASE_S = 60  # an erasure's lease; renewed at every batch, so only a dead replica loses it
_TENANT_PAGE = 100


class AgentMemory(Protocol):
    """The chat agent's memory (the LangGraph checkpointer): one thread per conversation."""

    async def adelete_thread(self, thread_id: str) -> None: ...

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None: ...


class EventStreams(Protocol):
    """An event log (of runs, ingestion jobs or vision jobs): one stream per id."""

    async def delete(self, run_ids: Sequence[str]) -> int: ...


@dataclass(frozen=True)
class Streams:
    runs: EventStreams
    ingestion: EventStreams
    vision: EventStreams


# principal, text -> the text with personal data replaced (the guardrails' PII rail)
Redactor = Callable[[Principal, str], Awaitable[str]]
# one batch in one transaction: (session, batch size) -> rows handled (< batch size: done)
_Step = Callable[[AsyncSession, int], Awaitable[int]]
_Work = Callable[["_Lease"], Awaitable[Erasure]]


class _StillRunning(Exception):
    """The subject's runs did not stop in time: the erasure waits for its next try."""


class PrivacyService:
    def __init__(
        self,
        *,
        db: Database,
        redis: Redis,
        keys: KeySpace,
        settings: PrivacySettings,
        secret: str,
        auth: AuthService,
        streams: Streams,
        memory: AgentMemory | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._db = db
        self._redis = redis
        self._keys = keys.child("privacy")
        self._settings = settings
        self._secret = secret.encode()
        self._auth = auth
        self._streams = streams
        self._memory = memory
        self._redactor = redactor
        # Asks the replica executing a run to stop it (the run service's, wired by the app;
        # without one, as in the CLI, an erasure waits for runs to end by themselves).
        self.stop_run: Callable[[uuid.UUID], Awaitable[None]] | None = None
        self._defaults = PrivacyPolicy.model_validate(settings.policy).model_dump(mode="json")
        self._cache: dict[uuid.UUID, tuple[float, PrivacyPolicy]] = {}
        self._cache_s = settings.policy_cache_s
        self._erasures: dict[str, asyncio.Task[Erasure]] = {}

    async def close(self, grace_s: float) -> None:
        """Lets erasures in progress go on for `grace_s`, then cancels them (they resume
        later: their subjects stay marked)."""
        await drain(self._erasures.values(), grace_s)  # type: ignore[arg-type]

    # -- policies ---------------------------------------------------------------------------

    async def policy(self, tenant_id: uuid.UUID) -> PrivacyPolicy:
        cached = self._cache.get(tenant_id)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        async with self._db.session(tenant_id) as session:
            stored = await repo.stored_policy(session, tenant_id)
        try:
            policy = PrivacyPolicy.model_validate(merge(self._defaults, stored or {}))
        except ValidationError:  # stored by a version that accepted more
            log.exception("stored privacy policy of tenant %s is invalid", tenant_id)
            policy = PrivacyPolicy.model_validate(self._defaults)
        self._cache[tenant_id] = (now + self._cache_s, policy)
        return policy

    async def update_policy(
        self,
        tenant_id: uuid.UUID,
        change: dict[str, Any],
        *,
        actor_id: uuid.UUID | None,
        replace: bool = False,
        via: str | None = None,
    ) -> PrivacyPolicy:
        """Merges `change` into the tenant's stored policy (or replaces it with `change`)
        after validating the result; audited."""
        async with self._db.session(tenant_id) as session:
            stored = await repo.lock_policy(session, tenant_id)
            document = change if replace else merge(stored or {}, change)
            try:
                policy = PrivacyPolicy.model_validate(merge(self._defaults, document))
            except ValidationError as exc:
                raise ValidationFailed.listing("invalid privacy policy", exc) from exc
            await repo.save_policy(session, tenant_id, document, actor_id)
            await record(
                session,
                "privacy.policy_updated",
                Outcome.SUCCESS,
                tenant_id=tenant_id,
                actor_id=actor_id,
                change=change,
                replace=replace or None,
                via=via,
            )
        self._cache[tenant_id] = (time.monotonic() + self._cache_s, policy)
        return policy

    async def stored_message(self, principal: Principal, text: str) -> str:
        """A user's chat message as it is to be stored: redacted when the tenant's policy
        says so (the kinds of the tenant's PII rail; every kind when the rails are off)."""
        if not (await self.policy(principal.tenant_id)).store_messages_redacted:
            return text
        if self._redactor is not None:
            return await self._redactor(principal, text)
        return await asyncio.to_thread(lambda: redact(text, find_pii(text)))

    # -- batches ------------------------------------------------------------------------------

    async def _batches(
        self,
        tenant_id: uuid.UUID | None,
        step: _Step,
        *,
        lease: _Lease | None = None,
        size: int | None = None,
    ) -> int:
        """Runs `step` in its own transaction until it handles less than a full batch;
        returns the rows handled in all."""
        n = size or self._settings.purge_batch_size
        total = 0
        while True:
            if lease is not None:
                await lease.renew()
            async with self._db.session(tenant_id) as session:
                done = await step(session, n)
            total += done
            if done < n:
                return total

    # -- purges -------------------------------------------------------------------------------

    async def purge(self, tenant_id: uuid.UUID | None = None) -> Removed:
        """One pass over every tenant (or one): erasures left unfinished are finished, data
        past its retention deleted, and unscoped audit events past theirs. Bounded by
        `purge_timeout_s`; what is left is the next pass's."""
        removed = Removed()
        try:
            async with asyncio.timeout(self._settings.purge_timeout_s):
                async with self._db.session() as session:
                    erasing = await repo.tenants_being_erased(session)
                for erased in erasing:
                    if tenant_id in (None, erased):
                        work = functools.partial(self._erase_tenant, erased, None)
                        await self._resume(f"tenant:{erased}", work)
                if tenant_id is not None:
                    if tenant_id not in erasing:
                        removed.add(await self._purge_one(tenant_id))
                    return removed
                after: uuid.UUID | None = None
                while True:
                    async with self._db.session() as session:
                        tenants = await repo.tenants_after(session, after, _TENANT_PAGE)
                    for tenant in tenants:
                        if tenant.erasure_requested_at is None:
                            removed.add(await self._purge_one(tenant.id))
                    if len(tenants) < _TENANT_PAGE:
                        break
                    after = tenants[-1].id
                days = self._settings.unscoped_audit_days
                if days is not None:
                    before = datetime.now(UTC) - timedelta(days=days)
                    removed.audit_events += await self._batches(
                        None, lambda s, n: repo.purge_unscoped_audit(s, before, n)
                    )
        except TimeoutError:
            log.warning(
                "purge pass stopped after %.0f s; the next pass goes on",
                self._settings.purge_timeout_s,
            )
        return removed

    async def _purge_one(self, tenant_id: uuid.UUID) -> Removed:
        async with self._db.session(tenant_id) as session:
            users = await repo.users_being_erased(session)
        for user_id in users:
            work = functools.partial(self._erase_user, tenant_id, user_id, None)
            await self._resume(f"user:{user_id}", work)
        return await self.purge_tenant(tenant_id)

    async def purge_tenant(self, tenant_id: uuid.UUID) -> Removed:
        """Deletes the tenant's data past its retention, kind by kind, batch by batch."""
        policy = await self.policy(tenant_id)
        now = datetime.now(UTC)
        removed = Removed()
        purges = {
            DataKind.EVENTS: self._purge_events,
            DataKind.MESSAGES: self._purge_messages,
            DataKind.DOCUMENTS: self._purge_documents,
            DataKind.VISION: self._purge_vision,
            DataKind.AUDIT: self._purge_audit,
        }
        for kind, purge in purges.items():
            days = policy.retention.days(kind)
            if days is not None:
                await purge(tenant_id, now - timedelta(days=days), removed)
        if removed.as_dict():
            async with self._db.session(tenant_id) as session:
                await record(
                    session,
                    "privacy.purged",
                    Outcome.SUCCESS,
                    tenant_id=tenant_id,
                    removed=removed.as_dict(),
                )
        return removed

    async def _purge_events(self, tenant_id: uuid.UUID, before: datetime, out: Removed) -> None:
        """The streams of runs and jobs created before `before`. A watermark per tenant in
        Redis says up to when this was done, so a pass reads only the window since."""
        mark = self._keys("events-done", str(tenant_id))
        raw = await self._redis.get(mark)
        since = datetime.fromtimestamp(float(raw), UTC) if raw else None
        n = self._settings.purge_batch_size
        for model, stream in (
            (Run, self._streams.runs),
            (IngestionJob, self._streams.ingestion),
            (VisionJob, self._streams.vision),
        ):
            where = [model.created_at < before]
            if since is not None:
                where.append(model.created_at >= since)
            after: tuple[Any, ...] | None = None
            while True:
                async with self._db.session(tenant_id) as session:
                    rows = await repo.page(
                        session, model, *where, order=(model.created_at, model.id), after=after,
                        limit=n,
                    )  # fmt: skip
                out.event_streams += await stream.delete([str(r.id) for r in rows])
                if len(rows) < n:
                    break
                after = (rows[-1].created_at, rows[-1].id)
        await self._redis.set(mark, str(before.timestamp()))

    async def _purge_messages(self, tenant_id: uuid.UUID, before: datetime, out: Removed) -> None:
        async def messages(session: AsyncSession, n: int) -> int:
            batch = await repo.ids(
                session, Message, Message.created_at < before, limit=n, skip_locked=True
            )
            touched = await repo.conversations_touched(session, batch)
            out.messages += await repo.delete_ids(session, Message, batch)
            # the agent rebuilds its memory of these conversations from what is left
            out.memory_threads += await self._forget_threads(touched)
            return len(batch)

        async def runs(session: AsyncSession, n: int) -> int:
            batch = await repo.ids(
                session,
                Run,
                Run.created_at < before,
                Run.status.not_in(repo.ACTIVE_RUN),
                limit=n,
                skip_locked=True,
            )
            await self._forget_runs(batch, out)
            out.runs += await repo.delete_ids(session, Run, batch)
            return len(batch)

        async def conversations(session: AsyncSession, n: int) -> int:
            batch = await repo.empty_conversations(session, before, n)
            out.memory_threads += await self._forget_threads(batch)
            out.conversations += await repo.delete_ids(session, Conversation, batch)
            return len(batch)

        for step in (messages, runs, conversations):
            await self._batches(tenant_id, step)

    async def _purge_documents(self, tenant_id: uuid.UUID, before: datetime, out: Removed) -> None:
        await self._delete_documents(
            tenant_id, [Document.updated_at < before], out, skip_locked=True
        )
        await self._delete_jobs(
            tenant_id,
            IngestionJob,
            [IngestionJob.created_at < before, IngestionJob.status.not_in(repo.ACTIVE_INGESTION)],
            out,
            skip_locked=True,
        )

    async def _purge_vision(self, tenant_id: uuid.UUID, before: datetime, out: Removed) -> None:
        await self._delete_jobs(
            tenant_id,
            VisionJob,
            [VisionJob.created_at < before, VisionJob.status.not_in(repo.ACTIVE_VISION)],
            out,
            skip_locked=True,
        )

    async def _purge_audit(self, tenant_id: uuid.UUID, before: datetime, out: Removed) -> None:
        async def step(session: AsyncSession, n: int) -> int:
            batch = await repo.ids(
                session, AuditEvent, AuditEvent.created_at < before, limit=n, skip_locked=True
            )
            out.audit_events += await repo.delete_ids(session, AuditEvent, batch)
            return len(batch)

        await self._batches(tenant_id, step)

    # -- deleting, shared by purges and erasures ------------------------------------------------

    async def _delete_documents(
        self,
        tenant_id: uuid.UUID,
        where: list[Any],
        out: Removed,
        *,
        skip_locked: bool = False,
        lease: _Lease | None = None,
    ) -> None:
        async def step(session: AsyncSession, n: int) -> int:
            batch = await repo.ids(session, Document, *where, limit=n, skip_locked=skip_locked)
            for document_id in batch:
                out.documents += await remove_document(session, tenant_id, document_id)
            return len(batch)

        await self._batches(
            tenant_id, step, lease=lease, size=self._settings.purge_document_batch_size
        )

    async def _delete_jobs(
        self,
        tenant_id: uuid.UUID,
        model: type[IngestionJob] | type[VisionJob],
        where: list[Any],
        out: Removed,
        *,
        skip_locked: bool = False,
        lease: _Lease | None = None,
    ) -> None:
        """Ingestion or vision jobs, with their event streams."""
        stream = self._streams.vision if model is VisionJob else self._streams.ingestion

        async def step(session: AsyncSession, n: int) -> int:
            batch = await repo.ids(session, model, *where, limit=n, skip_locked=skip_locked)
            out.event_streams += await stream.delete([str(i) for i in batch])
            deleted = await repo.delete_ids(session, model, batch)
            if model is VisionJob:
                out.vision_jobs += deleted
            else:
                out.ingestion_jobs += deleted
            return len(batch)

        await self._batches(tenant_id, step, lease=lease)

    async def _delete_conversations(
        self, tenant_id: uuid.UUID, where: Any, out: Removed, lease: _Lease
    ) -> None:
        """Conversations with their messages and runs, a batch of conversations at a time:
        Redis first (run streams, memory), then the rows, messages in batches."""
        n = self._settings.purge_batch_size
        while True:
            await lease.renew()
            async with self._db.session(tenant_id) as session:
                batch = await repo.ids(session, Conversation, where, limit=n)
                runs = await repo.run_ids_of(session, batch)
            if not batch:
                return
            await self._forget_runs(runs, out)
            out.memory_threads += await self._forget_threads(batch)

            async def messages(session: AsyncSession, n: int, batch: list[Any] = batch) -> int:
                done = await repo.delete_messages_of(session, batch, n)
                out.messages += done
                return done

            await self._batches(tenant_id, messages, lease=lease)
            for start in range(0, len(runs), n):
                async with self._db.session(tenant_id) as session:
                    out.runs += await repo.delete_ids(session, Run, runs[start : start + n])
            async with self._db.session(tenant_id) as session:
                out.conversations += await repo.delete_ids(session, Conversation, batch)

    async def _delete_all(
        self, tenant_id: uuid.UUID, model: Any, lease: _Lease, out: Removed | None = None
    ) -> int:
        async def step(session: AsyncSession, n: int) -> int:
            batch = await repo.ids(session, model, limit=n)
            if model is ApiKey:  # a verified key must not be trusted from the cache either
                hashes = await repo.api_key_hashes(session, None, batch)
                await self._auth.forget_cached(tenant_id, [], hashes)
            elif model is User:  # nor failed sign-ins counted under an e-mail address
                await self._auth.forget_cached(tenant_id, await repo.emails(session, batch), [])
                for user_id in batch:  # their access tokens and open streams end now
                    await self._auth.end_sessions_of(user_id)
            await repo.delete_ids(session, model, batch)
            return len(batch)

        return await self._batches(tenant_id, step, lease=lease)

    async def _forget_threads(self, conversation_ids: Sequence[uuid.UUID]) -> int:
        if self._memory is None:
            return 0
        for conversation_id in conversation_ids:
            await self._memory.adelete_thread(str(conversation_id))
        return len(conversation_ids)

    async def _forget_runs(self, run_ids: Sequence[uuid.UUID], out: Removed) -> None:
        """The runs' event streams and the checkpoints they wrote (before their rows go)."""
        names = [str(r) for r in run_ids]
        out.event_streams += await self._streams.runs.delete(names)
        if self._memory is not None and names:
            await self._memory.adelete_for_runs(names)

    # -- erasure: requests ----------------------------------------------------------------------

    def pseudonym(self, kind: str, ident: uuid.UUID) -> str:
        """What the audit log calls an erased subject: stable, and not reversible without the
        server's secret key and the erased id."""
        digest = hmac.new(self._secret, f"{kind}:{ident}".encode(), hashlib.sha256).hexdigest()
        return f"erased-{kind}-{digest[:20]}"

    async def erase_user(
        self,
        principal: Principal | None,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        via: str | None = None,
    ) -> Erasure:
        """Erases a user: their conversations and messages, agent memory, run event streams,
        the documents they ingested, their ingestion and vision jobs and their credentials;
        usage is kept without them, audit events under their pseudonym. An admin of the tenant
        asks (`principal`), or the CLI (None). Answers PENDING when it takes longer than
        `erasure_wait_s` (it goes on in the background)."""
        subject = self.pseudonym("user", user_id)
        if principal is not None and (
            principal.tenant_id != tenant_id or not principal.has(Scope.ADMIN)
        ):
            raise NotFound("no such user", id=str(user_id))
        actor_id = principal.user_id if principal else None
        async with self._db.session(tenant_id) as session:
            owners = await repo.lock_owners(session)
            user = await repo.lock_user(session, user_id)
            if user is None:
                if await repo.erased_before(session, "privacy.user_erased", subject):
                    return Erasure(subject, ErasureStatus.COMPLETED)
                raise NotFound("no such user", id=str(user_id))
            if user.erasure_requested_at is None:
                self._check_erasable(principal, user, owners)
                user.is_active = False
                user.erasure_requested_at = datetime.now(UTC)
                await repo.revoke_credentials(session, user_id, user.erasure_requested_at)
                await record(
                    session,
                    "privacy.user_erasure_requested",
                    Outcome.SUCCESS,
                    tenant_id=tenant_id,
                    actor_id=actor_id,
                    subject=subject,
                    via=via,
                )
        # Committed: the user is disabled. What they hold (access tokens, cached keys, open
        # streams on every replica) ends now, not when it expires.
        await self._auth.end_sessions_of(user_id)
        work = functools.partial(self._erase_user, tenant_id, user_id, actor_id)
        return await self._run_erasure(f"user:{user_id}", subject, work)

    @staticmethod
    def _check_erasable(principal: Principal | None, user: User, owners: list[uuid.UUID]) -> None:
        if user.role is not UserRole.OWNER:
            return
        if principal is not None and principal.role is not UserRole.OWNER:
            raise ErasureRefused("only an owner can erase an owner")
        if owners == [user.id]:
            raise ErasureRefused("a tenant keeps at least one owner; erase the tenant instead")

    async def erase_tenant(
        self, principal: Principal | None, tenant_id: uuid.UUID, *, via: str | None = None
    ) -> Erasure:
        """Erases a tenant and everything in it. A platform operator asks (an owner of the
        `operator_tenant`, never for that tenant itself), or the CLI (None)."""
        if principal is not None:
            await self._require_operator(principal, tenant_id)
        subject = self.pseudonym("tenant", tenant_id)
        async with self._db.session(principal.tenant_id if principal else None) as session:
            tenant = await repo.lock_tenant(session, tenant_id)
            if tenant is None:
                if await repo.erased_before(session, "privacy.tenant_erased", subject):
                    return Erasure(subject, ErasureStatus.COMPLETED)  # by this operator tenant
                raise NotFound("no such tenant", id=str(tenant_id))
            if tenant.erasure_requested_at is None:
                tenant.is_active = False
                tenant.erasure_requested_at = datetime.now(UTC)
                await self._record_tenant_event(
                    session, principal, "privacy.tenant_erasure_requested", tenant, via=via
                )
        work = functools.partial(self._erase_tenant, tenant_id, principal)
        return await self._run_erasure(f"tenant:{tenant_id}", subject, work)

    async def _require_operator(self, principal: Principal, tenant_id: uuid.UUID) -> None:
        """Operators may erase any tenant but their own. To anyone else another tenant does
        not exist (NOT_FOUND, as everywhere), and their own is not theirs to erase."""
        is_operator = await self._auth.is_platform_operator(
            principal, self._settings.operator_tenant
        )
        if is_operator and tenant_id == principal.tenant_id:
            raise ErasureRefused("the operators' own tenant is erased only with the CLI")
        if is_operator:
            return
        async with self._db.session(principal.tenant_id) as session:
            await record(
                session,
                "permission.denied",
                Outcome.DENIED,
                tenant_id=principal.tenant_id,
                actor_id=principal.user_id,
                what="Mutation.eraseTenant",
            )
        if tenant_id == principal.tenant_id:
            raise NotOperator("only platform operators erase tenants")
        raise NotFound("no such tenant", id=str(tenant_id))

    async def _record_tenant_event(
        self,
        session: AsyncSession,
        principal: Principal | None,
        event: str,
        tenant: Tenant,
        **details: Any,
    ) -> None:
        # In the operator's tenant (whose admins see it), or in none from the CLI: either way
        # the record outlives the erased tenant.
        await record(
            session,
            event,
            Outcome.SUCCESS,
            tenant_id=principal.tenant_id if principal else None,
            actor_id=principal.user_id if principal else None,
            subject=self.pseudonym("tenant", tenant.id),
            tenant=str(tenant.id),
            slug=tenant.slug,
            **details,
        )

    async def _run_erasure(self, key: str, subject: str, work: _Work) -> Erasure:
        """Runs the erasure in a task this service owns (a client that leaves does not stop
        it) and waits up to `erasure_wait_s` for it."""
        task = self._erasures.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._leased(key, subject, work), name=f"erase-{key}")
            self._erasures[key] = task
            task.add_done_callback(functools.partial(self._forget_task, key))
        done, _ = await asyncio.wait({task}, timeout=self._settings.erasure_wait_s)
        if not done or task.cancelled():
            return Erasure(subject, ErasureStatus.PENDING)
        return task.result()  # its exception, if it failed

    def _forget_task(self, key: str, task: asyncio.Task[Erasure]) -> None:
        if self._erasures.get(key) is task:
            del self._erasures[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("erasure of %s failed; it resumes later", key, exc_info=task.exception())

    async def _leased(self, key: str, subject: str, work: _Work) -> Erasure:
        lease = _Lease(self._redis, self._keys("erasing", key))
        if not await lease.acquire():  # another replica is at it
            return Erasure(subject, ErasureStatus.PENDING)
        try:
            return await work(lease)
        except _StillRunning:
            return Erasure(subject, ErasureStatus.PENDING)
        finally:
            await lease.release()

    async def _resume(self, key: str, work: _Work) -> None:
        task = self._erasures.get(key)
        if task is not None and not task.done():
            return  # in progress here
        try:
            await self._leased(key, key, work)
        except Exception:  # one subject's failure must not stop the pass
            log.exception("resuming the erasure of %s failed", key)

    # -- erasure: the work ------------------------------------------------------------------

    async def _stop_runs(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID | None
    ) -> dict[uuid.UUID, uuid.UUID]:
        """Asks the subject's runs to stop and waits (up to `run_stop_timeout_s`) until they
        have: a run still going would write the conversation's memory back after it was
        erased. Raises _StillRunning when some have not stopped. Runs unchanged for
        `stale_run_s` are dead (their replica crashed before it could fail them) and ignored.
        Returns the runs it stopped, with their conversations."""
        stopped: dict[uuid.UUID, uuid.UUID] = {}
        deadline = time.monotonic() + self._settings.run_stop_timeout_s
        while True:
            alive = datetime.now(UTC) - timedelta(seconds=self._settings.stale_run_s)
            async with self._db.session(tenant_id) as session:
                running = await repo.active_runs(session, user_id, alive)
            if not running:
                return stopped
            if self.stop_run is not None:
                for run_id in running.keys() - stopped.keys():
                    await self.stop_run(run_id)
            stopped |= running
            if time.monotonic() >= deadline:
                raise _StillRunning(f"{len(running)} run(s) still going")
            await asyncio.sleep(0.2)

    async def _sweep_stopped(self, stopped: dict[uuid.UUID, uuid.UUID], out: Removed) -> None:
        """Once more, what runs that were stopped may have written while they ended (their
        last event, the agent's memory of the turn)."""
        if stopped:
            await self._forget_runs(list(stopped), out)
            await self._forget_threads(list(set(stopped.values())))

    async def _erase_user(
        self,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        actor_id: uuid.UUID | None,
        lease: _Lease,
    ) -> Erasure:
        subject = self.pseudonym("user", user_id)
        out = Removed()
        async with self._db.session(tenant_id) as session:
            user = await repo.lock_user(session, user_id)
            if user is None:  # finished by someone else meanwhile
                return Erasure(subject, ErasureStatus.COMPLETED)
            email = user.email
            hashes = await repo.api_key_hashes(session, user_id)
        await self._auth.forget_cached(tenant_id, [email], hashes)
        stopped = await self._stop_runs(tenant_id, user_id)
        await self._delete_conversations(tenant_id, Conversation.owner_id == user_id, out, lease)
        await self._delete_documents(tenant_id, [Document.created_by == user_id], out, lease=lease)
        for model in (IngestionJob, VisionJob):
            await self._delete_jobs(
                tenant_id, model, [model.created_by == user_id], out, lease=lease
            )

        async def usage(session: AsyncSession, n: int) -> int:
            done = await repo.anonymise_usage(session, user_id, n)
            out.usage_records_anonymised += done
            return done

        await self._batches(tenant_id, usage, lease=lease)
        await self._pseudonymise_audit(tenant_id, user_id, email, subject, out, lease)
        await self._sweep_stopped(stopped, out)
        async with self._db.session(tenant_id) as session:
            out.users += await repo.delete_ids(session, User, [user_id])  # keys, tokens cascade
            await record(
                session,
                "privacy.user_erased",
                Outcome.SUCCESS,
                tenant_id=tenant_id,
                actor_id=actor_id,
                subject=subject,
                removed=out.as_dict(),
            )
        return Erasure(subject, ErasureStatus.COMPLETED, out)

    async def _pseudonymise_audit(  # noqa: PLR0917 (one erasure's facts)
        self,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        email: str,
        subject: str,
        out: Removed,
        lease: _Lease,
    ) -> None:
        digest = hmac.new(self._secret, f"actor:{user_id}".encode(), hashlib.sha256).digest()
        pseudonymous_id = uuid.UUID(bytes=digest[:16], version=4)
        after: tuple[datetime, int] | None = None

        async def scoped(session: AsyncSession, n: int) -> int:
            nonlocal after  # every event of the tenant once, in keyset order
            keys = await repo.audit_page(session, after, n)
            out.audit_events_pseudonymised += await repo.pseudonymise_audit(
                session,
                [k[1] for k in keys],
                user_id=user_id,
                email=email,
                pseudonym=subject,
                pseudonymous_id=pseudonymous_id,
            )
            after = keys[-1] if keys else after
            return len(keys)

        async def unscoped(session: AsyncSession, n: int) -> int:  # throttled sign-ins
            done = await repo.pseudonymise_unscoped_audit(session, email, subject, n)
            out.audit_events_pseudonymised += done
            return done

        await self._batches(tenant_id, scoped, lease=lease)
        await self._batches(None, unscoped, lease=lease)

    async def _erase_tenant(
        self, tenant_id: uuid.UUID, principal: Principal | None, lease: _Lease
    ) -> Erasure:
        subject = self.pseudonym("tenant", tenant_id)
        out = Removed()
        async with self._db.session() as session:
            tenant = await repo.tenant(session, tenant_id)
        if tenant is None:
            return Erasure(subject, ErasureStatus.COMPLETED)
        for model in (RefreshToken, ApiKey, OAuthClient):  # no new session from here on
            await self._batches(
                tenant_id, functools.partial(repo.revoke_batch, model=model), lease=lease
            )
        stopped = await self._stop_runs(tenant_id, None)
        await self._delete_all(tenant_id, Chunk, lease)  # first: small transactions
        await self._delete_documents(tenant_id, [], out, lease=lease)
        for table in ("lexeme_stats", "guardrail_policies", "privacy_policies"):
            await self._batches(
                tenant_id, functools.partial(repo.delete_rows, table=table), lease=lease
            )
        for model in (IngestionJob, VisionJob):
            await self._delete_jobs(tenant_id, model, [], out, lease=lease)
        await self._delete_conversations(tenant_id, Conversation.id.is_not(None), out, lease)
        for model in (UsageRecord, AuditEvent, RefreshToken, OAuthClient, ApiKey):
            await self._delete_all(tenant_id, model, lease)
        out.users += await self._delete_all(tenant_id, User, lease)
        await self._sweep_stopped(stopped, out)
        async with self._db.session(principal.tenant_id if principal else None) as session:
            row = await repo.lock_tenant(session, tenant_id)
            if row is not None:
                await session.delete(row)
                await self._record_tenant_event(
                    session, principal, "privacy.tenant_erased", tenant, removed=out.as_dict()
                )
        return Erasure(subject, ErasureStatus.COMPLETED, out)

    # -- exports -----------------------------------------------------------------------------

    async def request_export(self, principal: Principal, user_id: uuid.UUID) -> ExportTicket:
        """A one-time download of a user's data, for the user or an admin of their tenant."""
        if user_id != principal.user_id and not principal.has(Scope.ADMIN):
            raise NotFound("no such user", id=str(user_id))
        async with self._db.session(principal.tenant_id) as session:
            if await session.get(User, user_id) is None:
                raise NotFound("no such user", id=str(user_id))
            ticket = ExportTicket(
                id=secrets.token_urlsafe(18),
                tenant_id=principal.tenant_id,
                user_id=user_id,
                requested_by=principal.user_id,
                expires_at=time.time() + self._settings.export_ttl_s,
            )
            await self._redis.set(
                self._keys("export", ticket.id),
                json.dumps(
                    {
                        "tenant": str(ticket.tenant_id),
                        "user": str(ticket.user_id),
                        "by": str(ticket.requested_by),
                    }
                ),
                ex=self._settings.export_ttl_s,
            )
            await record(
                session,
                "privacy.export_requested",
                Outcome.SUCCESS,
                tenant_id=principal.tenant_id,
                actor_id=principal.user_id,
                user=str(user_id),
            )
        return ticket

    async def open_export(self, principal: Principal, export_id: str) -> AsyncIterator[bytes]:
        """The archive of a requested export: to its requester only, once."""
        key = self._keys("export", export_id[:64])
        raw = await self._redis.get(key)
        ticket = json.loads(raw) if raw else None
        if (
            ticket is None
            or ticket["tenant"] != str(principal.tenant_id)
            or ticket["by"] != str(principal.user_id)
        ):
            raise ExportGone("no such export, or it expired or was downloaded already")
        if not await self._redis.delete(key):  # a download of it started meanwhile
            raise ExportGone("no such export, or it expired or was downloaded already")
        return await self.export_user(
            principal.tenant_id, uuid.UUID(ticket["user"]), actor_id=principal.user_id
        )

    async def export_user(
        self,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        actor_id: uuid.UUID | None,
        via: str | None = None,
    ) -> AsyncIterator[bytes]:
        """A user's data as one JSON document, read page by page while it streams: no
        transaction stays open across pages, and memory does not grow with the data."""
        async with self._db.session(tenant_id) as session:
            user = await session.get(User, user_id)
            tenant = await repo.tenant(session, tenant_id)
            if user is None or tenant is None:
                raise NotFound("no such user", id=str(user_id))
            await record(
                session,
                "privacy.exported",
                Outcome.SUCCESS,
                tenant_id=tenant_id,
                actor_id=actor_id,
                user=str(user_id),
                via=via,
            )
        return archive(functools.partial(self._pages, tenant_id), tenant, user)

    async def _pages(
        self, tenant_id: uuid.UUID, model: Any, where: Any, order: Sequence[Any]
    ) -> AsyncIterator[Any]:
        n = self._settings.export_page_size
        after: tuple[Any, ...] | None = None
        while True:
            async with self._db.session(tenant_id) as session:
                rows = await repo.page(session, model, where, order=order, after=after, limit=n)
            for row in rows:
                yield row
            if len(rows) < n:
                return
            after = tuple(getattr(rows[-1], c.key) for c in order)


class _Lease:
    """A subject's erasure lease in Redis: one replica holds it, renewing it every batch."""

    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end"

    def __init__(self, redis: Redis, key: str) -> None:
        self._redis = redis
        self._key = key
        self._token = secrets.token_hex(8)

    async def acquire(self) -> bool:
        return bool(await self._redis.set(self._key, self._token, nx=True, ex=LEASE_S))

    async def renew(self) -> None:
        await self._redis.expire(self._key, LEASE_S)

    async def release(self) -> None:
        with contextlib.suppress(Exception):  # it expires anyway
            await self._redis.eval(self._RELEASE, 1, self._key, self._token)  # type: ignore[misc]
