"""Chat runs: one agent turn each, executed as owned background tasks with a lease in Redis.

A run appends its events to the run's event log (so any replica can stream them), persists the
answer, and settles the caller's token budget. `cancel` reaches the replica that owns the run
through Redis pub/sub and stops generation (the provider's HTTP stream is closed). A replica that
dies stops renewing its leases; any other replica then fails those runs with WORKER_LOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from redis.asyncio import Redis
from sqlalchemy import select

from backend.agents.graph import Agent, StoredMessage, TurnContext
from backend.agents.models import ChatModel, ModelRegistry
from backend.auth.principal import Principal
from backend.config import ChatSettings
from backend.conversations.service import ConversationService
from backend.core.db import Database
from backend.core.metrics import Metrics
from backend.core.models import Message, MessageRole, Run, RunStatus
from backend.core.redis import KeySpace, listen
from backend.core.tasks import drain
from backend.errors import (
    AppError,
    Conflict,
    NotFound,
    ServiceUnavailable,
    ValidationFailed,
    is_overload,
)
from backend.inference.llm.base import LLMError
from backend.limits.budgets import BudgetExceeded, Budgets, Reservation, Resource
from backend.limits.ratelimit import RateLimiter
from backend.realtime.eventlog import RunEvent, RunEventLog

log = logging.getLogger(__name__)

CANCEL_CHANNEL = "runs:cancel"
CHARGE_EVERY = 16  # tokens charged to the budget per Redis call while streaming
QUEUE_POLL_S = 0.1  # how often a queued run looks whether its turn has come
CANCEL_CHECK_S = 0.25  # how often this replica reads its runs' cancel flags (pub/sub is faster)
WORKER_LOST = "WORKER_LOST"


class RunInProgress(Conflict):
    code = "RUN_IN_PROGRESS"


class OnBusy(StrEnum):
    """Double-texting policy: what a new message does while a turn is still running."""

    REJECT = "reject"
    INTERRUPT = "interrupt"
    ENQUEUE = "enqueue"


@dataclass
class _Turn:
    """What one executing run has produced so far."""

    principal: Principal
    run: Run
    model: ChatModel
    message: Message  # the user's
    reservation: Reservation
    active_key: str
    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # as the model reported them (all calls of the turn)
    uncharged: int = 0
    answer_id: uuid.UUID | None = None  # set once the complete answer is stored
    started: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    behind: bool = False  # created while another run of its conversation was going


@dataclass(frozen=True)
class StartedRun:
    run: Run
    user_message: Message


class RunService:
    def __init__(
        self,
        *,
        db: Database,
        redis: Redis,
        keys: KeySpace,
        events: RunEventLog,
        conversations: ConversationService,
        limiter: RateLimiter,
        budgets: Budgets,
        models: ModelRegistry,
        agent: Agent,
        settings: ChatSettings,
        metrics: Metrics | None = None,
        stored_text: Callable[[Principal, str], Awaitable[str]] | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        # What a user's message becomes when stored (the tenant's data protection policy may
        # redact it); None: stored as sent.
        self._stored_text = stored_text
        self._db = db
        self._redis = redis
        self._keys = keys.child("runs")
        self.events = events
        self._conversations = conversations
        self._limiter = limiter
        self._budgets = budgets
        self.models = models
        self.agent = agent
        self._settings = settings
        self.replica = uuid.uuid4().hex
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._members: dict[uuid.UUID, str] = {}  # lease entries of the runs this replica owns
        self._background: list[asyncio.Task[None]] = []
        self._closing = False
        self._stopped = False  # the background loops end (after the turns drained)

    # -- lifecycle of the supervisor (owned by the app's lifespan) ---------------------------

    async def start(self) -> None:
        self._background = [
            asyncio.create_task(self._listen_for_cancels(), name="runs-cancel-listener"),
            asyncio.create_task(self._keep_leases(), name="runs-lease-keeper"),
            asyncio.create_task(self._sweep_cancels(), name="runs-cancel-sweeper"),
        ]

    async def close(self, grace_s: float) -> None:
        """Lets running turns finish for `grace_s`, then cancels them (RunFailed SHUTDOWN)."""
        self._closing = True
        await drain(self._tasks.values(), grace_s)
        self._stopped = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.events.close()

    # -- API --------------------------------------------------------------------------------

    async def send_message(
        self,
        principal: Principal,
        conversation_id: uuid.UUID,
        content: str,
        on_busy: OnBusy = OnBusy.REJECT,
        *,
        model: str | None = None,
        attachments: Sequence[str] = (),
    ) -> StartedRun:
        """Starts a turn. When the conversation already has one going (double texting):
        REJECT refuses with RUN_IN_PROGRESS, INTERRUPT cancels it first, ENQUEUE runs this one
        after it. The user's message is stored at once in every case."""
        content = content.strip()
        if not content:
            raise ValidationFailed("content is empty", field="content")
        if len(content) > self._settings.max_message_chars:
            raise ValidationFailed(
                f"content is longer than {self._settings.max_message_chars} characters",
                field="content",
            )
        if len(attachments) > self._settings.max_attachments:
            raise ValidationFailed(
                f"at most {self._settings.max_attachments} attachments", field="attachments"
            )
        await self._conversations.get(principal, conversation_id)  # NOT_FOUND before anything
        chat_model = self.models.resolve(model)
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        await self._limiter.enforce(principal.subject, principal.plan, "chat_run")
        active_key = self._keys("active", str(principal.user_id))
        if await self._redis.scard(active_key) >= self._settings.max_active_runs_per_user:
            raise RunInProgress("too many runs going at once; wait for one to finish")
        if self._stored_text is not None:
            content = await self._stored_text(principal, content)
        reservation = await self._budgets.reserve(
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            plan=principal.plan,
            resource=Resource.LLM_TOKENS,
            amount=self._settings.max_tokens,
            subject="run",
        )
        try:
            async with self._db.session(principal.tenant_id) as session:
                conversation = await self._conversations.owned_for_update(
                    session, principal, conversation_id
                )
                busy = await session.scalar(
                    select(Run.id)
                    .where(
                        Run.conversation_id == conversation.id,
                        Run.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]),
                    )
                    .limit(1)
                )
                if busy is not None and on_busy is OnBusy.REJECT:
                    raise RunInProgress(
                        "this conversation already has a run going", runId=str(busy)
                    )
                if busy is not None and on_busy is OnBusy.INTERRUPT:
                    await self._request_cancel(busy)
                now = datetime.now(UTC)  # precise: queued runs go in this order
                run = Run(
                    tenant_id=principal.tenant_id,
                    conversation_id=conversation.id,
                    user_id=principal.user_id,
                    status=RunStatus.QUEUED,
                    model=chat_model.name,
                    created_at=now,
                    updated_at=now,
                )
                session.add(run)
                await session.flush()
                message = await self._conversations.append(
                    session,
                    conversation,
                    MessageRole.USER,
                    content,
                    author_id=principal.user_id,
                    run_id=run.id,
                    meta={"attachments": list(attachments)} if attachments else None,
                )
        except BaseException:
            await reservation.release()
            raise
        reservation.subject = f"run:{run.id}"
        await self.events.append(
            str(run.id), "RunStarted", {"conversationId": str(conversation_id), "model": run.model}
        )
        await self._redis.sadd(active_key, str(run.id))
        self._tasks[run.id] = asyncio.create_task(
            self._execute(
                _Turn(
                    principal,
                    run,
                    chat_model,
                    message,
                    reservation,
                    active_key,
                    behind=busy is not None,
                )
            ),
            name=f"run-{run.id}",
        )
        return StartedRun(run, message)

    async def cancel(self, principal: Principal, run_id: uuid.UUID) -> Run:
        run = await self.get(principal, run_id)
        if run.status in {RunStatus.QUEUED, RunStatus.RUNNING}:
            await self._request_cancel(run.id)
        return run

    async def stop(self, run_id: uuid.UUID) -> None:
        """Asks whichever replica executes the run to stop it (administration: erasures)."""
        await self._request_cancel(run_id)

    async def _request_cancel(self, run_id: uuid.UUID) -> None:
        # The flag is what counts (the run checks it while streaming and while queued); the
        # message only makes the owning replica react at once. Pub/sub alone can be missed.
        await self._redis.set(
            self._keys("cancel", str(run_id)), 1, ex=int(self._settings.run_lease_s * 4) + 60
        )
        await self._redis.publish(self._keys(CANCEL_CHANNEL), str(run_id))

    async def _wait_for_turn(self, turn: _Turn) -> None:
        """A queued (or interrupting) run waits until earlier runs of its conversation end.
        One created with none going has nothing to wait for: runs are created under the
        conversation's row lock, so no earlier one can appear later."""
        if not turn.behind:
            return
        cancel_flag = self._keys("cancel", str(turn.run.id))
        while True:
            async with self._db.session(turn.principal.tenant_id) as session:
                earlier = await session.scalar(
                    select(Run.id)
                    .where(
                        Run.conversation_id == turn.run.conversation_id,
                        Run.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]),
                        Run.created_at < turn.run.created_at,
                    )
                    .limit(1)
                )
            if earlier is None:
                return
            if await self._redis.exists(cancel_flag):
                raise asyncio.CancelledError("cancelled while queued")
            await asyncio.sleep(QUEUE_POLL_S)

    async def get(self, principal: Principal, run_id: uuid.UUID) -> Run:
        async with self._db.session(principal.tenant_id) as session:
            run = await session.get(Run, run_id)
        if run is None or run.user_id != principal.user_id:
            raise NotFound("no such run", id=str(run_id))
        return run

    async def stream(
        self, principal: Principal, run_id: uuid.UUID, after: str | None
    ) -> AsyncIterator[RunEvent]:
        await self.get(principal, run_id)  # authorisation: the caller's own run
        return self.events.read(str(run_id), after)

    # -- execution ----------------------------------------------------------------------------

    async def _execute(self, turn: _Turn) -> None:
        run = turn.run
        self._metrics.chat_active_runs.inc()
        self._members[run.id] = self._member(run)
        await self._redis.zadd(self._keys("leases"), {self._member(run): self._deadline()})
        outcome, code, detail = RunStatus.COMPLETED, None, ""
        try:
            await self._wait_for_turn(turn)
            await self._set_status(turn.principal, run.id, RunStatus.RUNNING)
            context = TurnContext(
                hooks=_Hooks(self, turn),
                model=turn.model,
                message_id=str(turn.message.id),
                content=turn.message.content,
                run_id=str(run.id),
                attachments=tuple((turn.message.meta or {}).get("attachments", ())),
            )
            await self.agent.run(context, run.conversation_id)
        except asyncio.CancelledError:
            outcome = RunStatus.CANCELLED
            if self._closing:
                outcome, code, detail = RunStatus.FAILED, "SERVER_SHUTDOWN", "server shut down"
        except (BudgetExceeded, AppError) as exc:
            outcome, code, detail = RunStatus.FAILED, exc.code, exc.message
        except LLMError as exc:
            outcome, code, detail = RunStatus.FAILED, exc.code, str(exc)
        except Exception as exc:
            if is_overload(exc):
                outcome, code = RunStatus.FAILED, ServiceUnavailable.code
                detail = "a backing service is busy or unreachable"
            else:
                log.exception("run %s failed", run.id)
                outcome, code, detail = RunStatus.FAILED, "INTERNAL_SERVER_ERROR", "internal error"
        finally:
            await asyncio.shield(self._finish(turn, outcome, code, detail))

    async def _deliver(self, turn: _Turn, text: str) -> None:
        """One piece of the answer: metrics, a cancel check, the event, the budget."""
        now = time.perf_counter()
        model = turn.run.model
        if turn.last_token is None:
            self._metrics.chat_ttft.labels(model).observe(now - turn.started)
        else:
            self._metrics.chat_inter_token.labels(model).observe(now - turn.last_token)
        turn.last_token = now
        turn.text.append(text)
        turn.uncharged += 1
        await self.events.append(
            str(turn.run.id), "TokenDelta", {"text": text, "index": len(turn.text) - 1}
        )
        if turn.uncharged >= CHARGE_EVERY:
            turn.uncharged = 0
            await turn.reservation.charge(CHARGE_EVERY)

    async def _store_answer(self, turn: _Turn, answer: str, notes: dict) -> None:
        async with self._db.session(turn.principal.tenant_id) as session:
            conversation = await self._conversations.owned_for_update(
                session, turn.principal, turn.run.conversation_id
            )
            message = await self._conversations.append(
                session,
                conversation,
                MessageRole.ASSISTANT,
                answer,
                run_id=turn.run.id,
                complete=True,
                meta=notes,
            )
        turn.answer_id = message.id

    async def _finish(self, turn: _Turn, outcome: RunStatus, code: str | None, detail: str) -> None:
        run, reservation, principal = turn.run, turn.reservation, turn.principal
        run_key = str(run.id)
        answer = "".join(turn.text)
        prompt_tokens = turn.prompt_tokens
        try:
            # Charge what the model reported (summaries and tool rounds included) or, when it
            # reported nothing, the pieces delivered; never less than what was already charged.
            completion_tokens = max(turn.completion_tokens, len(turn.text))
            owed = completion_tokens - int(reservation.charged)
            if owed > 0:
                with contextlib.suppress(BudgetExceeded):
                    await reservation.charge(owed)
            cost = turn.model.cost(prompt_tokens, completion_tokens)
            message_id = turn.answer_id
            async with self._db.session(principal.tenant_id) as session:
                row = await session.get(Run, run.id, with_for_update=True)
                if message_id is None and answer:  # a partial answer (cancelled, failed)
                    conversation = await self._conversations.owned_for_update(
                        session, principal, run.conversation_id
                    )
                    partial = await self._conversations.append(
                        session,
                        conversation,
                        MessageRole.ASSISTANT,
                        answer,
                        run_id=run.id,
                        complete=False,
                    )
                    message_id = partial.id
                if row is not None:
                    row.status = outcome
                    row.error_code = code
                    row.message_id = message_id
                    row.prompt_tokens = prompt_tokens
                    row.completion_tokens = completion_tokens
                    row.updated_at = datetime.now(UTC)
                await reservation.settle(session, cost=cost)
            body = {
                "messageId": str(message_id) if message_id else None,
                "usage": {
                    "promptTokens": prompt_tokens,
                    "completionTokens": completion_tokens,
                    "cost": float(cost),
                },
                "latencyMs": round((time.perf_counter() - turn.started) * 1000, 1),
            }
            if outcome is RunStatus.COMPLETED:
                await self.events.append(run_key, "RunCompleted", body)
            elif outcome is RunStatus.CANCELLED:
                await self.events.append(run_key, "RunCancelled", body)
            else:
                await self.events.append(
                    run_key, "RunFailed", {**body, "code": code, "message": detail}
                )
        except Exception:
            log.exception("could not record the end of run %s", run.id)
            await self.events.append(
                run_key,
                "RunFailed",
                {"code": "INTERNAL_SERVER_ERROR", "message": "could not store the answer"},
            )
        finally:
            elapsed = time.perf_counter() - turn.started
            self._metrics.chat_active_runs.dec()
            self._metrics.chat_runs.labels(outcome.value, run.model).inc()
            self._metrics.chat_tokens.labels(run.model).inc(len(turn.text))
            if outcome is RunStatus.COMPLETED and turn.text and elapsed > 0:
                self._metrics.chat_tokens_per_second.labels(run.model).observe(
                    len(turn.text) / elapsed
                )
            self._tasks.pop(run.id, None)
            self._members.pop(run.id, None)
            await self._redis.srem(turn.active_key, run_key)
            await self._redis.zrem(self._keys("leases"), self._member(run))

    async def _history(self, turn: _Turn) -> list[StoredMessage]:
        async with self._db.session(turn.principal.tenant_id) as session:
            rows = list(
                await session.scalars(
                    select(Message)
                    .where(
                        Message.conversation_id == turn.run.conversation_id,
                        Message.seq <= turn.message.seq,
                    )
                    .order_by(Message.seq.desc())
                    .limit(self._settings.history_messages + 1)
                )
            )
        return [StoredMessage(str(m.id), m.role.value, m.content) for m in reversed(rows)]

    async def _set_status(self, principal: Principal, run_id: uuid.UUID, status: RunStatus) -> None:
        async with self._db.session(principal.tenant_id) as session:
            row = await session.get(Run, run_id)
            if row is not None:
                row.status = status

    # -- cancellation and leases ------------------------------------------------------------

    def _member(self, run: Run) -> str:
        return f"{run.tenant_id}:{run.id}:{run.user_id or ''}"

    def _deadline(self) -> float:
        return time.time() + self._settings.run_lease_s

    async def _listen_for_cancels(self) -> None:
        """Cancels the runs this replica owns when any replica publishes their id."""
        await listen(
            self._redis,
            self._keys(CANCEL_CHANNEL),
            self._cancel_published,
            stopped=lambda: self._stopped,
            name="cancel listener",
        )

    def _cancel_published(self, data: bytes) -> None:
        with contextlib.suppress(ValueError):
            task = self._tasks.get(uuid.UUID(data.decode()))
            if task is not None:
                task.cancel("cancelled by the client")

    async def _sweep_cancels(self) -> None:
        """Reads the cancel flags of every run executing here, in one command per interval: a
        cancel whose pub/sub message was missed still stops its run within CANCEL_CHECK_S."""
        while True:
            await asyncio.sleep(CANCEL_CHECK_S)
            running = list(self._tasks.items())
            if not running:
                continue
            try:
                flags = await self._redis.mget([self._keys("cancel", str(r)) for r, _ in running])
            except Exception as exc:  # a Redis hiccup must not end the sweep
                log.warning("cancel sweep: %s", exc)
                continue
            for (_, task), flag in zip(running, flags, strict=True):
                if flag is not None and not task.done():
                    task.cancel("cancelled by the client")

    async def _keep_leases(self) -> None:
        """Renews this replica's leases; fails runs whose replica stopped renewing theirs."""
        key = self._keys("leases")
        while True:
            await asyncio.sleep(self._settings.run_lease_s / 3)
            try:
                if self._members:
                    deadline = self._deadline()
                    await self._redis.zadd(
                        key, dict.fromkeys(self._members.values(), deadline), xx=True
                    )
                lost = await self._redis.zrangebyscore(key, "-inf", time.time())
                for raw in lost:
                    if await self._redis.zrem(key, raw):  # one replica wins the claim
                        await self._fail_lost(raw.decode())
            except Exception:  # a Redis hiccup must not end the upkeep loop
                log.exception("lease upkeep failed")

    async def _fail_lost(self, member: str) -> None:
        tenant, run_id, _user = member.split(":")
        async with self._db.session(uuid.UUID(tenant)) as session:
            row = await session.get(Run, uuid.UUID(run_id), with_for_update=True)
            if row is None or row.status not in {RunStatus.QUEUED, RunStatus.RUNNING}:
                return
            row.status = RunStatus.FAILED
            row.error_code = WORKER_LOST
        await self.events.append(
            run_id,
            "RunFailed",
            {"code": WORKER_LOST, "message": "the server running this turn stopped"},
        )


class _Hooks:
    """The agent's view of the run executing it (see `TurnHooks`)."""

    def __init__(self, service: RunService, turn: _Turn) -> None:
        self._service = service
        self._turn = turn
        self.principal = turn.principal

    async def token(self, text: str) -> None:
        await self._service._deliver(self._turn, text)

    async def event(self, kind: str, body: dict) -> None:
        await self._service.events.append(str(self._turn.run.id), kind, body)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._turn.prompt_tokens += prompt_tokens
        self._turn.completion_tokens += completion_tokens

    async def history(self) -> list[StoredMessage]:
        return await self._service._history(self._turn)

    async def persist(self, answer: str, notes: dict) -> None:
        await self._service._store_answer(self._turn, answer, notes)
