"""Chat runs: one agent turn each, executed as owned background tasks with a lease in Redis.

A run appends its events to the run's event log (so any replica can stream them), persists the
answer, and settles the caller's token budget. `cancel` reaches the replica that owns the run
through Redis pub/sub and stops generation (the provider's HTTP stream is closed).

Crashes and outages. A run holds a lease (backend.core.leases) from before it is created until
its end is recorded. A replica that dies stops renewing its leases; another replica (or the
same one, restarted) then claims each run and fails it with WORKER_LOST: the answer streamed so
far is rebuilt from the run's event log and stored with `complete: false`, the run leaves its
user's active runs, and its token reservation is settled. A short PostgreSQL or Redis outage
fails nothing: every step retries for `outage_retry_s`, and no replica claims a lease until it
has reached Redis for the grace period itself (owners renew first).
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
from decimal import Decimal
from enum import StrEnum
from typing import Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.agents.graph import Agent, StoredMessage, TurnContext
from backend.agents.models import ChatModel, ModelRegistry, request_key
from backend.auth.principal import Principal
from backend.config import ChatSettings
from backend.conversations.service import ConversationService
from backend.core.db import Database
from backend.core.leases import Leases, Work, cancel_when_revoked
from backend.core.metrics import Metrics
from backend.core.models import Conversation, Message, MessageRole, Run, RunStatus
from backend.core.redis import KeySpace, ScriptedPipeline, listen
from backend.core.retry import retrying
from backend.core.tasks import cancel_and_wait, drain
from backend.core.telemetry import MODEL, MODEL_VERSION, TENANT
from backend.errors import (
    AppError,
    Conflict,
    NotFound,
    ServiceUnavailable,
    ValidationFailed,
    is_overload,
)
from backend.inference.llm.base import LLMError
from backend.lifecycle.drift import DriftRecorder
from backend.limits.budgets import BudgetExceeded, Budgets, Reservation, Resource
from backend.limits.ratelimit import RateLimiter
from backend.realtime.eventlog import TOKEN_DELTA, EventsExpired, RunEvent, RunEventLog

log = logging.getLogger(__name__)

CANCEL_CHANNEL = "runs:cancel"
CHARGE_EVERY = 16  # tokens charged to the budget per Redis call while streaming
QUEUE_POLL_S = 0.1  # how often a queued run looks whether its turn has come
CANCEL_CHECK_S = 0.25  # how often this replica reads its runs' cancel flags (pub/sub is faster)
CANCEL_POLL_S = 0.1  # how often cancel looks whether a run on another replica has ended
WORKER_LOST = "WORKER_LOST"
T = TypeVar("T")
_GOING = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
_ENDED_ELSEWHERE = object()  # _record_end: the run was ended by another replica (taken for lost)
_DELETED = object()  # _record_end: the run's row went with its conversation while it ran


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
    money: Reservation  # the run's cost on the money budget (holds nothing; charged as tokens are)
    active_key: str
    text: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # as the model reported them (all calls of the turn)
    uncharged: int = 0
    answer_id: uuid.UUID | None = None  # set once the complete answer is stored
    started: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    behind: bool = False  # created while another run of its conversation was going
    # Tokens not yet in the event log (batched under load: see RunService._deliver), and the
    # order of the run's appends: token batches and other events go into the log one at a time.
    unsent: list[str] = field(default_factory=list)
    sent_at: float = 0.0  # when the last token batch left (time.monotonic)
    send_timer: asyncio.Task[None] | None = None  # sleeping until the batch is due
    timers: set[asyncio.Task[None]] = field(default_factory=set)  # held until done
    send_error: Exception | None = None  # a batch the timer could not append
    appending: asyncio.Lock = field(default_factory=asyncio.Lock)
    # read as a queued run started (RunService._start), else when first needed (_history)
    history: list[StoredMessage] | None = None


@dataclass(frozen=True)
class StartedRun:
    run: Run
    user_message: Message


@dataclass(frozen=True)
class CancelledRun:
    run: Run  # as it stood when cancel returned
    stopping: bool  # asked to stop but not ended yet: its last event will say how it ended


# The `operation` label of a failed run's sightline_errors_total sample.
CHAT_RUN_OPERATION = "chatRun"


class ServedHook(Protocol):
    """Told of every ended run or completion, by the version that served it (the lifecycle's
    serving statistics: backend.lifecycle.stats.ServingStats.record)."""

    def __call__(
        self,
        model: str,
        version: str,
        *,
        ok: bool,
        latency_s: float,
        tokens: int = 0,
        compute_s: float = 0.0,
        cost: float = 0.0,
    ) -> None: ...


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
        served: ServedHook | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._tracer = tracer or trace.NoOpTracer()
        self.served = served  # the lifecycle's statistics, when wired
        self.drift: DriftRecorder | None = None  # each answer's drift samples, when wired
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
        self._running = asyncio.Event()  # set while turns execute here: the sweep reads then
        # (tenant, user) of each run executing here: its events' subscription is authorised
        # without a unit of work (the row says the same; it is checked for any other run)
        self._owners: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID]] = {}
        self._leases = Leases(
            redis,
            self._keys("leases"),
            lease_s=settings.run_lease_s,
            grace_s=settings.run_lost_grace_s,
            on_lost=self._recover_lost,
            on_revoked=cancel_when_revoked(self._tasks, "the run was taken over as lost"),
            recover_timeout_s=3 * settings.outage_retry_s + 60,
            find_unleased=self._unleased,
            scan_every_s=20 * settings.run_lease_s,
            name="runs",
        )
        self._background: list[asyncio.Task[None]] = []
        self._closing = False
        self._stopped = False  # the background loops end (after the turns drained)

    # -- lifecycle of the supervisor (owned by the app's lifespan) ---------------------------

    async def start(self) -> None:
        self._background = [
            asyncio.create_task(self._listen_for_cancels(), name="runs-cancel-listener"),
            asyncio.create_task(self._sweep_cancels(), name="runs-cancel-sweeper"),
        ]
        self._leases.start()

    async def close(self, grace_s: float) -> None:
        """Lets running turns finish for `grace_s`, then cancels them (RunFailed SHUTDOWN)."""
        self._closing = True
        await drain(self._tasks.values(), grace_s)
        self._stopped = True
        await self._leases.close(grace_s)
        await cancel_and_wait(self._background)
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
        """Starts a turn and stores the user's message at once. When the conversation already
        has one going (double texting): REJECT refuses with RUN_IN_PROGRESS and stores nothing
        (no run would answer the message; the client keeps it to send again), INTERRUPT cancels
        the running turn first, ENQUEUE runs this one after it."""
        content = self._checked(content, attachments)
        await self._conversations.check_owned(principal, conversation_id)  # NOT_FOUND first
        run_id = uuid.uuid4()
        key = request_key(principal, conversation_id=conversation_id, request_id=str(run_id))
        self.models.resolve(model, key)  # an unknown model or version: BAD_USER_INPUT first
        if self._closing:
            raise ServiceUnavailable("the server is shutting down")
        await self._limiter.enforce(principal.subject, principal.plan, "chat_run")
        active_key = self._keys("active", str(principal.user_id))
        if self._stored_text is not None:
            content = await self._stored_text(principal, content)
        member = Work(principal.tenant_id, run_id, principal.user_id).member
        # held until the run ends: a version retired meanwhile closes after it
        chat_model = self.models.checkout(model, key)
        try:
            reservation, money = await self._admit(principal, run_id, member, active_key)
        except BaseException:
            self.models.release(chat_model)
            raise
        try:
            now = datetime.now(UTC)  # precise: queued runs go in this order
            run = Run(
                id=run_id,
                tenant_id=principal.tenant_id,
                conversation_id=conversation_id,
                user_id=principal.user_id,
                # With nothing ahead it starts at once: stored RUNNING, it needs no
                # transaction of its own before its first token (see _run_turn).
                status=RunStatus.RUNNING,
                model=chat_model.name,
                model_alias=chat_model.alias,
                model_version=chat_model.version,
                created_at=now,
                updated_at=now,
            )
            message = Message(
                tenant_id=principal.tenant_id,
                conversation_id=conversation_id,
                seq=0,  # the next one, given by the insert
                role=MessageRole.USER,
                author_id=principal.user_id,
                content=content,
                run_id=run_id,
                meta={"attachments": list(attachments)} if attachments else {},
            )
            # the conversation locked and the turn stored: one round trip, committed
            busy = await self._conversations.start_turn(
                principal, run, message, reject_busy=on_busy is OnBusy.REJECT
            )
            if busy is not None and on_busy is OnBusy.REJECT:
                raise RunInProgress("this conversation already has a run going", runId=str(busy))
            if busy is not None and on_busy is OnBusy.INTERRUPT:
                await self._request_cancel(busy)
        except BaseException:
            self.models.release(chat_model)
            await self._undo_admission(member, active_key, str(run_id), [reservation, money])
            raise
        await self._announce(run)
        self._launch(
            _Turn(
                principal,
                run,
                chat_model,
                message,
                reservation,
                money,
                active_key,
                behind=busy is not None,
            )
        )
        return StartedRun(run, message)

    def _launch(self, turn: _Turn) -> None:
        """Executes the turn in a task of its own, owned by this service until it ends."""
        run_id = turn.run.id
        self._owners[run_id] = (turn.principal.tenant_id, turn.principal.user_id)
        # Readers here take its events as they are appended, until the task is done (even one
        # cancelled before it started, or before its end was recorded: they read on from Redis).
        self.events.producing(str(run_id))
        task = asyncio.create_task(self._execute(turn), name=f"run-{run_id}")
        task.add_done_callback(lambda _: self.events.produced(str(run_id)))
        self._tasks[run_id] = task
        self._running.set()

    async def _announce(self, run: Run) -> None:
        """The run's first event: which model version serves it."""
        try:
            await self.events.append_retrying(
                str(run.id),
                "RunStarted",
                {
                    "conversationId": str(run.conversation_id),
                    "model": run.model,
                    "modelAlias": run.model_alias,
                    "modelVersion": run.model_version,
                },
                within_s=self._settings.outage_retry_s,
            )
        except Exception as exc:  # the run is accepted: it goes on, and its end is recovered
            log.warning("run %s: RunStarted not recorded: %r", run.id, exc)

    def _checked(self, content: str, attachments: Sequence[str]) -> str:
        """The message as stored: not empty, within the size limits."""
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
        return content

    async def _admit(
        self, principal: Principal, run_id: uuid.UUID, member: str, active_key: str
    ) -> tuple[Reservation, Reservation]:
        """The run's lease, its place among its user's active runs, its tokens held and its
        money admitted, in one round trip. Refused (RunInProgress at the user's limit of runs
        going at once, BudgetExceeded) with none of it left."""
        run_key = str(run_id)
        calls = ScriptedPipeline(self._redis)
        # The lease first: should this replica die from here on, whoever claims it finds what
        # there is of the run (its reservations, its row) and cleans up.
        owned = self._leases.acquire_in(calls.pipe, member)
        calls.pipe.smembers(active_key)
        calls.pipe.sadd(active_key, run_key)
        budget = {
            "tenant_id": principal.tenant_id,
            "user_id": principal.user_id,
            "plan": principal.plan,
            "subject": f"run:{run_id}",
            "hold_id": run_key,
        }
        reserved = [
            self._budgets.reserve_in(
                calls, resource=Resource.LLM_TOKENS, amount=self._settings.max_tokens, **budget
            ),
            self._budgets.admit_in(calls, **budget),  # holds nothing, refused when spent
        ]
        try:
            replies = await calls.execute()
        except BaseException:
            # What it did is not known: the lease, if made, expires unrenewed and recovery
            # gives back whatever else was (it ends the run, which has no row, as never made).
            self._leases.abandon(member)
            raise
        owned()
        held: list[Reservation] = []
        refused: AppError | None = None
        for reservation in reserved:
            try:
                held.append(reservation(replies))
            except BudgetExceeded as exc:
                refused = refused or exc
        going = [_text(r) for r in replies[1]]  # before this run joined them
        if await self._active_runs(principal, active_key, going) >= (
            self._settings.max_active_runs_per_user
        ):
            refused = RunInProgress("too many runs going at once; wait for one to finish")
        if refused is not None:
            await self._undo_admission(member, active_key, run_key, held)
            raise refused
        return held[0], held[1]

    async def _undo_admission(
        self, member: str, active_key: str, run_key: str, held: Sequence[Reservation | None]
    ) -> None:
        """Gives back what `_admit` took for a run that is not going to be made."""
        try:  # in this order: should a step fail, the lease stays and recovery does the rest
            for reservation in held:
                if reservation is not None:
                    await reservation.release()
            await self._redis.srem(active_key, run_key)
            await self._leases.release(member)
        except Exception as exc:
            self._leases.abandon(member)
            log.warning("run %s not created; cleanup left to recovery: %r", run_key, exc)

    async def _active_runs(self, principal: Principal, active_key: str, runs: list[str]) -> int:
        """How many of `runs` (the user's active runs) are going. At the limit, entries whose
        lease is gone or lost are dropped first (a replica died before cleaning up): nobody
        stays locked out."""
        if len(runs) < self._settings.max_active_runs_per_user:
            return len(runs)
        live = await self._leases.live([_lease_of(principal, r) for r in runs])
        stale = [r for r, ok in zip(runs, live, strict=True) if not ok]
        if stale:
            log.warning("dropping %d stale active runs of user %s", len(stale), principal.user_id)
            await self._redis.srem(active_key, *stale)
        return len(runs) - len(stale)

    async def cancel(
        self, principal: Principal, run_id: uuid.UUID, *, wait: bool = True
    ) -> CancelledRun:
        """Asks a going run to stop and waits up to `cancel_wait_s` for it to end, so the
        caller mostly gets the final status (CANCELLED, or COMPLETED/FAILED when the run ended
        first); one that has not ended by then is returned `stopping`. An ended run is
        returned as it is. `wait=False`: returns at once (a client that left)."""
        run = await self.get(principal, run_id)
        if run.status not in _GOING:
            return CancelledRun(run, stopping=False)
        await self._request_cancel(run.id)
        wait_s = self._settings.cancel_wait_s if wait else 0.0
        deadline = time.monotonic() + wait_s
        local = self._tasks.get(run.id)
        if local is not None:  # executed here: its end is awaited first
            await asyncio.wait([local], timeout=wait_s)
            run = await self.get(principal, run_id)
        # then polled: elsewhere, or here when the task ended before its end was recorded (a
        # second cancellation, from the cancel sweep, cuts the wait for the shielded record)
        while run.status in _GOING and time.monotonic() < deadline:
            await asyncio.sleep(min(CANCEL_POLL_S, max(0.0, deadline - time.monotonic())))
            run = await self.get(principal, run_id)
        return CancelledRun(run, stopping=run.status in _GOING)

    async def stop_conversation(self, principal: Principal, conversation_id: uuid.UUID) -> None:
        """Stops the caller's runs of a conversation about to be deleted, waiting for them as
        `cancel` does: one left going would stream on at the model's cost, and write the
        thread's memory back after the deletion forgot it. A run that ends only after the
        deletion (it outlasted the wait, or started meanwhile) finds its row gone and cleans
        up then (see `_finish`)."""
        async with self._db.session(principal.tenant_id) as session:
            going = await session.scalars(
                select(Run.id).where(
                    Run.conversation_id == conversation_id,
                    Run.user_id == principal.user_id,
                    Run.status.in_(_GOING),
                )
            )
            run_ids = list(going)
        await asyncio.gather(*(self.cancel(principal, run_id) for run_id in run_ids))

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

        async def earlier_run() -> uuid.UUID | None:
            async with self._db.session(turn.principal.tenant_id) as session:
                return await session.scalar(
                    select(Run.id)
                    .where(
                        Run.conversation_id == turn.run.conversation_id,
                        Run.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]),
                        Run.created_at < turn.run.created_at,
                    )
                    .limit(1)
                )

        while True:
            earlier = await self._retrying(earlier_run, "the queue check")
            if earlier is None:
                return
            if await self._retrying(lambda: self._redis.exists(cancel_flag), "a cancel check"):
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
        if self._owners.get(run_id) != (principal.tenant_id, principal.user_id):
            await self.get(principal, run_id)  # authorisation: the caller's own run
        return self.events.read(str(run_id), after)

    # -- execution ----------------------------------------------------------------------------

    async def _execute(self, turn: _Turn) -> None:
        """Runs a turn in its `chat.turn` span: a child of the request that started it (the
        task carries that request's trace context), parent of the turn's steps."""
        with self._tracer.start_as_current_span("chat.turn") as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        MODEL: turn.run.model,
                        MODEL_VERSION: turn.model.version,
                        TENANT: str(turn.principal.tenant_id),
                        "sightline.run_id": str(turn.run.id),
                    }
                )
            await self._run_turn(turn)

    async def _run_turn(self, turn: _Turn) -> None:
        run = turn.run
        self._metrics.chat_active_runs.inc()
        outcome, code, detail = RunStatus.COMPLETED, None, ""
        try:
            if turn.behind:
                self._metrics.chat_queued_runs.inc()
                try:
                    await self._wait_for_turn(turn)
                finally:
                    self._metrics.chat_queued_runs.dec()
                await self._start(turn)
            self._metrics.chat_queue_wait.labels(run.model, turn.model.version).observe(
                time.perf_counter() - turn.started
            )
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
            if is_overload(exc):  # the operator's log says which service and where
                log.warning("run %s failed: %r", run.id, exc, exc_info=True)
                outcome, code = RunStatus.FAILED, ServiceUnavailable.code
                detail = "a backing service is busy or unreachable"
            else:
                log.exception("run %s failed", run.id)
                outcome, code, detail = RunStatus.FAILED, "INTERNAL_SERVER_ERROR", "internal error"
        finally:
            await asyncio.shield(self._finish(turn, outcome, code, detail))

    async def _deliver(self, turn: _Turn, text: str) -> None:
        """One piece of the answer: metrics, the event, the budget.

        Under load (at least `stream_batch_min_runs` runs executing here), pieces that come
        within `stream_batch_ms` of the run's last TokenDelta wait for the next one, which then
        carries them all: every event costs its readers a GraphQL execution and a WebSocket
        frame, whatever its size. The first piece after a quiet spell, and every piece below
        that load, is appended at once. Each event is one log entry, so cursors stay exact."""
        now = time.perf_counter()
        model, version = turn.run.model, turn.model.version
        if turn.last_token is None:
            self._metrics.chat_ttft.labels(model, version).observe(now - turn.started)
        else:
            self._metrics.chat_inter_token.labels(model, version).observe(now - turn.last_token)
        turn.last_token = now
        if turn.send_error is not None:  # the timer's append failed: the run fails with it
            raise turn.send_error
        turn.text.append(text)
        turn.uncharged += 1
        turn.unsent.append(text)
        if turn.send_timer is None:
            wait = self._batch_wait(turn)
            if wait > 0:
                timer = asyncio.create_task(
                    self._send_later(turn, wait), name=f"run-{turn.run.id}-tokens"
                )
                turn.send_timer = timer
                turn.timers.add(timer)  # a reference while it sends (the loop's is weak)
                timer.add_done_callback(turn.timers.discard)
            else:
                await self._send_tokens(turn)
        if turn.uncharged >= CHARGE_EVERY:
            turn.uncharged = 0
            await self._retrying(lambda: self._charge(turn, CHARGE_EVERY), "a budget charge")

    async def _charge(self, turn: _Turn, tokens: int, money: Decimal | None = None) -> None:
        """Charges tokens, and their money (by default: as completion tokens) in the same round
        trip; a free model charges tokens alone."""
        cost = turn.model.cost(0, tokens) if money is None else money
        await self._budgets.charge_with_money(turn.reservation, turn.money, tokens, float(cost))

    async def _last_charge(self, turn: _Turn, tokens: int, cost: Decimal) -> None:
        """Charges the tokens and money of the run not charged yet and gives back the rest of
        its holds, in one round trip (the run is over: a budget used up by it refuses the
        next one; the usage is recorded with the run's end)."""
        owed = max(0, tokens - int(turn.reservation.charged))
        money_owed = max(0.0, float(cost) - turn.money.charged)
        await self._retrying(
            lambda: self._budgets.close([(turn.reservation, owed), (turn.money, money_owed)]),
            "the last charge",
        )

    def _batch_wait(self, turn: _Turn) -> float:
        """How long the run's next TokenDelta waits for more pieces (0: it goes now)."""
        window = self._settings.stream_batch_ms / 1000
        if window <= 0 or len(self._tasks) < self._settings.stream_batch_min_runs:
            return 0.0
        return turn.sent_at + window - time.monotonic()

    async def _send_later(self, turn: _Turn, wait: float) -> None:
        """The batch timer (owned by the turn; `_settle_tokens` cancels it while it sleeps)."""
        await asyncio.sleep(wait)
        turn.send_timer = None  # from here on a send like any other: not cancelled
        try:
            await self._send_tokens(turn)
        except Exception as exc:  # kept for the run, which fails with it at its next piece
            turn.send_error = exc

    async def _send_tokens(self, turn: _Turn) -> None:
        """Appends the pieces not yet in the log as one TokenDelta (`index`: the last one's)."""
        async with turn.appending:
            if not turn.unsent:
                return
            pieces, turn.unsent = turn.unsent, []
            turn.sent_at = time.monotonic()
            body: dict = {"text": "".join(pieces), "index": len(turn.text) - 1}
            if len(pieces) > 1:
                body["merged"] = len(pieces)
            await self.events.append_retrying(
                str(turn.run.id), TOKEN_DELTA, body, within_s=self._settings.outage_retry_s
            )

    async def _settle_tokens(self, turn: _Turn) -> None:
        """Every piece delivered so far into the log, before another event goes after them."""
        timer, turn.send_timer = turn.send_timer, None
        if timer is not None:  # still asleep (it clears itself when it wakes): no send started
            timer.cancel()
        if turn.send_error is not None:
            error, turn.send_error = turn.send_error, None
            raise error
        await self._send_tokens(turn)

    async def _append_event(self, turn: _Turn, kind: str, body: dict) -> None:
        """A run's other events (tools, citations, rails): after the pieces before them."""
        await self._settle_tokens(turn)
        async with turn.appending:  # through an outage, as the tokens are
            await self.events.append_retrying(
                str(turn.run.id), kind, body, within_s=self._settings.outage_retry_s
            )

    async def _store_answer(self, turn: _Turn, answer: str, notes: dict) -> None:
        if self.drift is not None:
            self.drift.chat_turn(
                turn.model.alias,
                turn.model.version,
                prompt_chars=len(turn.message.content),
                answer_chars=len(answer),
                rails=notes.get("guardrails"),
            )
        with self._tracer.start_as_current_span("chat.persist"):
            await self._store_answer_once(turn, answer, notes)

    async def _store_answer_once(self, turn: _Turn, answer: str, notes: dict) -> None:
        async def store() -> uuid.UUID:
            async with self._db.session(turn.principal.tenant_id) as session:
                conversation = await self._conversations.owned_for_update(
                    session, turn.principal, turn.run.conversation_id
                )
                stored, last_seq = await self._conversations.answer_and_last_seq(
                    session, conversation, turn.run.id
                )
                if stored is not None:  # a retry after a lost reply
                    return stored
                # the title first: the append's flush writes it with `updated_at`, one UPDATE
                await self._conversations.title_untitled(
                    session, conversation, self._settings.auto_title_chars, first=turn.message
                )
                message = await self._conversations.append(
                    session,
                    conversation,
                    MessageRole.ASSISTANT,
                    answer,
                    run_id=turn.run.id,
                    complete=True,
                    meta={**notes, "model": turn.model.served},
                    seq=last_seq + 1,
                )
                return message.id

        turn.answer_id = await self._retrying(store, "storing an answer")

    async def _finish(self, turn: _Turn, outcome: RunStatus, code: str | None, detail: str) -> None:
        """Records the end: the row (and a partial answer), the usage, the terminal event; then
        the run leaves the user's active runs and its lease goes. When the end cannot be
        recorded (an outage longer than `outage_retry_s`), the lease is left to expire and
        recovery records it (as WORKER_LOST, with the partial answer)."""
        run = turn.run
        run_key = str(run.id)
        member = self._member(run)
        answer = "".join(turn.text)
        prompt_tokens = turn.prompt_tokens
        # Charge what the model reported (summaries and tool rounds included) or, when it
        # reported nothing, the pieces delivered; never less than what was already charged.
        # The prompts count too: a knowledge-base prompt is ~1,000 tokens the model read.
        completion_tokens = max(turn.completion_tokens, len(turn.text))
        cost = turn.model.cost(prompt_tokens, completion_tokens)
        _traced_end(outcome, code, prompt_tokens, completion_tokens)
        recorded = False
        try:
            await self._settle_tokens(turn)  # the pieces still batched, before the end
            await self._last_charge(turn, prompt_tokens + completion_tokens, cost)
            message_id = await self._retrying(
                lambda: self._record_end(
                    turn,
                    outcome,
                    code=code,
                    answer=answer,
                    completion_tokens=completion_tokens,
                    cost=cost,
                ),
                f"recording the end of run {run.id}",
            )
            ended_here = message_id is not _ENDED_ELSEWHERE
            if message_id is _DELETED:  # what its steps wrote to memory goes with it too
                await self.agent.forget(run.conversation_id)
                outcome, message_id = RunStatus.CANCELLED, None
            if ended_here:
                kind, body = _end_event(
                    outcome,
                    code,
                    detail,
                    message_id,
                    usage=(prompt_tokens, completion_tokens, cost),
                    latency_s=time.perf_counter() - turn.started,
                )
                await self.events.append_retrying(
                    run_key, kind, body, within_s=self._settings.outage_retry_s
                )
            recorded = True
            if not ended_here:  # the lease is the claimer's now (or gone): not this replica's
                self._leases.abandon(member)
        except Exception:
            log.exception("could not record the end of run %s; left to recovery", run.id)
        finally:
            elapsed = time.perf_counter() - turn.started
            version = turn.model.version
            self.models.release(turn.model)
            self._metrics.chat_active_runs.dec()
            self._metrics.chat_runs.labels(outcome.value, run.model, version).inc()
            self._metrics.chat_tokens.labels(run.model, version).inc(len(turn.text))
            self._metrics.chat_cost.labels(str(turn.principal.tenant_id), run.model, version).inc(
                float(cost)
            )
            self._metrics.model_spent(
                turn.principal.tenant_id, turn.model.alias, version, "chat", float(cost)
            )
            if code is not None:
                self._metrics.error("chat_run", code, CHAT_RUN_OPERATION, run.model)
            if outcome is RunStatus.COMPLETED and turn.text and elapsed > 0:
                self._metrics.chat_tokens_per_second.labels(run.model, version).observe(
                    len(turn.text) / elapsed
                )
            if self.served is not None and outcome is not RunStatus.CANCELLED:
                self.served(
                    turn.model.alias,
                    version,
                    ok=outcome is RunStatus.COMPLETED,
                    latency_s=elapsed,
                    tokens=completion_tokens,
                    cost=float(cost),
                )
            self._tasks.pop(run.id, None)
            self._owners.pop(run.id, None)
            await self._leave(member, turn.active_key, run_key, recorded)

    async def _record_end(
        self,
        turn: _Turn,
        outcome: RunStatus,
        *,
        code: str | None,
        answer: str,
        completion_tokens: int,
        cost: Decimal,
    ) -> uuid.UUID | object | None:
        """One unit of work: the run's row, a partial answer, the usage. Returns the answer's
        id, or _ENDED_ELSEWHERE when another replica ended the run (it took this one for
        lost: its lease was claimed) and recorded all that already."""
        run, principal = turn.run, turn.principal
        async with self._db.session(principal.tenant_id) as session:
            # The row's end, if the run is still going (the UPDATE locks it): one statement,
            # not a locked read and a write.
            message_id = turn.answer_id
            ended = await session.scalar(
                update(Run)
                .where(Run.id == run.id, Run.status.in_(_GOING))
                .values(
                    status=outcome,
                    error_code=code,
                    message_id=message_id,
                    prompt_tokens=turn.prompt_tokens,
                    completion_tokens=completion_tokens,
                    updated_at=datetime.now(UTC),
                )
                .returning(Run.id)
            )
            if ended is None:
                if await session.get(Run, run.id) is not None:
                    return _ENDED_ELSEWHERE
                # Deleted with its conversation while it ran: what it consumed still counts.
                await turn.reservation.settle(
                    session, cost=cost, served_by=(turn.model.alias, turn.model.version, "chat")
                )
                return _DELETED
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
                    meta={"model": turn.model.served},
                )
                message_id = partial.id
                await session.execute(
                    update(Run).where(Run.id == run.id).values(message_id=message_id)
                )
            # The holds went with the last charge: the usage is recorded, no round trip.
            await turn.reservation.settle(
                session, cost=cost, served_by=(turn.model.alias, turn.model.version, "chat")
            )
        return message_id

    async def _leave(self, member: str, active_key: str, run_key: str, recorded: bool) -> None:
        """The run leaves its user's active runs, then its lease goes (if still this
        replica's); what cannot be done now is left to recovery (the lease stays until then)."""
        if not recorded:
            self._leases.abandon(member)
            return
        owned = self._leases.owns(member)

        async def leave() -> None:  # one round trip, in this order
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.srem(active_key, run_key)
                if owned:
                    self._leases.release_in(pipe, member)
                await pipe.execute()

        try:
            await self._retrying(leave, "leaving")
        except Exception as exc:
            self._leases.abandon(member)
            log.warning("run %s: cleanup left to recovery: %r", run_key, exc)

    async def _history(self, turn: _Turn) -> list[StoredMessage]:
        """The conversation up to the turn's message: as read when the run started, else now
        (it cannot change: later messages come after it)."""
        if turn.history is None and turn.message.seq == 1:  # its first message: no query
            turn.history = [_stored(turn.message)]
        if turn.history is None:

            async def read() -> list[StoredMessage]:
                async with self._db.session(turn.principal.tenant_id) as session:
                    return await self._read_history(session, turn)

            turn.history = await self._retrying(read, "reading the history")
        return turn.history

    async def _start(self, turn: _Turn) -> None:
        """A queued run, its turn come, is RUNNING (one UPDATE of a run still going: one that
        ended meanwhile, recovered by another replica, keeps its end) and its history is read,
        in one unit of work. A run created with nothing ahead is stored RUNNING already, and
        reads its history only when the agent's memory is gone (`_history`)."""

        async def start() -> list[StoredMessage]:
            async with self._db.session(turn.principal.tenant_id) as session:
                await session.execute(
                    update(Run)
                    .where(Run.id == turn.run.id, Run.status.in_(_GOING))
                    .values(status=RunStatus.RUNNING)
                )
                return await self._read_history(session, turn)

        turn.history = await self._retrying(start, "starting a run")

    async def _read_history(self, session: AsyncSession, turn: _Turn) -> list[StoredMessage]:
        message = turn.message
        if message.seq == 1:  # the conversation's first message: the history is that message
            return [_stored(message)]
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
        rows.reverse()
        return [
            StoredMessage(
                str(m.id),
                m.role.value,
                m.content,
                refused=m.role is MessageRole.USER and _refused(rows[i + 1 : i + 2]),
            )
            for i, m in enumerate(rows)
        ]

    def _retrying(self, step: Callable[[], Awaitable[T]], what: str) -> Awaitable[T]:
        return retrying(step, within_s=self._settings.outage_retry_s, what=what)

    # -- cancellation and leases ------------------------------------------------------------

    def _member(self, run: Run) -> str:
        return Work(run.tenant_id, run.id, run.user_id).member

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
        cancel whose pub/sub message was missed still stops its run within CANCEL_CHECK_S. With
        no run here it sleeps until one starts: an idle replica's timer wakeups are its CPU."""
        while True:
            if not self._tasks:
                self._running.clear()
                await self._running.wait()
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

    async def _recover_lost(self, member: str) -> bool:
        """A run whose replica stopped renewing its lease. Idempotent (a replica that dies
        while recovering leaves the lease to expire again): ends the row as WORKER_LOST with
        the partial answer rebuilt from the event log (or as COMPLETED when the whole answer
        was stored already), settles the reservation, makes sure the log ends with the
        matching terminal event, and takes the run out of its user's active runs."""
        work = Work.of(member)
        tenant_id, run_id, user_id = work.tenant_id, work.id, work.user_id
        run_key = str(run_id)
        text, tokens = await self._retrying(lambda: self._streamed(run_key), "reading a log")
        reservation, money = [
            await self._retrying(
                lambda resource=resource: self._budgets.recover(  # type: ignore[misc]
                    tenant_id=tenant_id, user_id=user_id, resource=resource, hold_id=run_key
                ),
                "reading a reservation",
            )
            for resource in (Resource.LLM_TOKENS, Resource.COST)
        ]
        if reservation is not None and tokens > reservation.charged:  # delivered, not charged
            with contextlib.suppress(BudgetExceeded):
                owed = tokens - reservation.charged
                await self._retrying(lambda: reservation.charge(owed), "charging a lost run")
        ended = await self._retrying(
            lambda: self._end_lost(tenant_id, run_id, text, tokens, reservation, money=money),
            f"ending lost run {run_key}",
        )
        if ended is not None:
            last = await self._retrying(lambda: self.events.last(run_key), "reading a log")
            if last is None or not last.terminal:
                kind, body = ended
                await self.events.append_retrying(
                    run_key, kind, body, within_s=self._settings.outage_retry_s
                )
        if user_id is not None:
            active_key = self._keys("active", str(user_id))
            await self._retrying(lambda: self._redis.srem(active_key, run_key), "leaving")
        log.warning("run %s recovered after its replica was lost", run_key)
        return True

    async def _unleased(self) -> list[str]:
        """Unfinished runs untouched for a lease and its grace (lease recovery keeps those that
        have no lease at all: Redis lost their owner's, or they predate leases)."""
        idle = self._settings.run_lease_s + self._settings.run_lost_grace_s
        return [Work(*row).member for row in await self._db.unfinished("run", idle)]

    async def _streamed(self, run_key: str) -> tuple[str, int]:
        """The answer a run streamed (its token events, in order) and how many pieces."""
        pieces: list[str] = []
        count = 0
        try:
            async for event in self.events.read(run_key, follow=False):
                if event.type == TOKEN_DELTA:
                    pieces.append(str(event.data.get("text", "")))
                    count += int(event.data.get("merged", 1))
        except EventsExpired:
            pass
        return "".join(pieces), count

    async def _end_lost(
        self,
        tenant_id: uuid.UUID,
        run_id: uuid.UUID,
        text: str,
        tokens: int,
        reservation: Reservation | None,
        *,
        money: Reservation | None = None,
    ) -> tuple[str, dict] | None:
        """One unit of work: ends a lost run's row (when it is still going), charges the money
        its replica had not (its record says what was) and settles its reservations. Returns
        the terminal event the row's state calls for (None: no row, the run was never created
        or was deleted with its conversation)."""
        async with self._db.session(tenant_id) as session:
            row = await session.get(Run, run_id, with_for_update=True)
            if row is None:
                for held in (reservation, money):
                    if held is not None:
                        await held.release()
                return None
            cost = self._cost(row, max(row.completion_tokens, tokens))
            if money is not None:
                owed = float(cost) - money.charged
                if owed > 1e-9:  # counted once, however often this unit of work is retried
                    with contextlib.suppress(BudgetExceeded):
                        await money.charge(owed)
                await money.release()
            if row.status in _GOING:
                answer = await session.scalar(
                    select(Message).where(
                        Message.conversation_id == row.conversation_id,
                        Message.run_id == run_id,
                        Message.role == MessageRole.ASSISTANT,
                    )
                )
                message_id = answer.id if answer is not None else None
                if answer is None and text:
                    conversation = await session.get(Conversation, row.conversation_id)
                    if conversation is not None:
                        partial = await self._conversations.append(
                            session,
                            conversation,
                            MessageRole.ASSISTANT,
                            text,
                            run_id=run_id,
                            complete=False,
                            meta={"model": _served(row)},
                        )
                        message_id = partial.id
                if answer is not None and answer.complete:  # stored whole before the crash
                    row.status, row.error_code = RunStatus.COMPLETED, None
                else:
                    row.status, row.error_code = RunStatus.FAILED, WORKER_LOST
                row.message_id = message_id
                row.completion_tokens = max(row.completion_tokens, tokens)
                row.updated_at = datetime.now(UTC)
            if reservation is not None:
                served_by = (row.model_alias or row.model, row.model_version or "", "chat")
                await reservation.settle(session, cost=cost, served_by=served_by)
        return _terminal_event(row, cost)

    def _cost(self, row: Run, completion_tokens: int) -> Decimal:
        """A lost run's cost at the prices of the version that served it (0: one no longer
        known here, or a run recorded before versions were)."""
        model = self.models.find(row.model_alias, row.model_version) if row.model_alias else None
        return model.cost(row.prompt_tokens, completion_tokens) if model else Decimal(0)


def _traced_end(
    outcome: RunStatus, code: str | None, prompt_tokens: int, completion_tokens: int
) -> None:
    """How the turn ended, on its `chat.turn` span (the current one)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "sightline.chat.outcome": outcome.value,
            "sightline.chat.prompt_tokens": prompt_tokens,
            "sightline.chat.completion_tokens": completion_tokens,
        }
    )
    if code is not None:
        span.set_status(Status(StatusCode.ERROR, code))


def _stored(message: Message) -> StoredMessage:
    return StoredMessage(str(message.id), message.role.value, message.content)


def _served(row: Run) -> dict[str, str | None]:
    """What a message records about the model of a run (as ChatModel.served)."""
    return {"alias": row.model_alias, "name": row.model, "version": row.model_version}


def _lease_of(principal: Principal, run_key: str) -> str:
    """The lease member of one of the user's runs ("" for an entry that is no run id)."""
    try:
        return Work(principal.tenant_id, uuid.UUID(run_key), principal.user_id).member
    except ValueError:
        return ""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _refused(next_messages: list[Message]) -> bool:
    """Whether the answer that follows a user message (if any) is the input rails' refusal."""
    if not next_messages or next_messages[0].role is not MessageRole.ASSISTANT:
        return False
    rails = (next_messages[0].meta or {}).get("guardrails")
    return isinstance(rails, list) and any(
        isinstance(r, dict) and r.get("stage") == "input" and r.get("action") == "block"
        for r in rails
    )


def _end_event(
    outcome: RunStatus,
    code: str | None,
    detail: str,
    message_id: object,
    *,
    usage: tuple[int, int, Decimal],
    latency_s: float,
) -> tuple[str, dict]:
    """A run's terminal event: kind and body."""
    prompt_tokens, completion_tokens, cost = usage
    body: dict = {
        "messageId": str(message_id) if message_id else None,
        "usage": {
            "promptTokens": prompt_tokens,
            "completionTokens": completion_tokens,
            "cost": float(cost),
        },
        "latencyMs": round(latency_s * 1000, 1),
    }
    if outcome is RunStatus.COMPLETED:
        return "RunCompleted", body
    if outcome is RunStatus.CANCELLED:
        return "RunCancelled", body
    return "RunFailed", {**body, "code": code, "message": detail}


def _terminal_event(row: Run, cost: Decimal) -> tuple[str, dict]:
    """The terminal event that matches a run's stored state (its latency is not known)."""
    if row.error_code == WORKER_LOST:
        message = "the server running this turn stopped"
    else:
        message = "the run failed"
    return _end_event(
        row.status,
        row.error_code or WORKER_LOST,
        message,
        row.message_id,
        usage=(row.prompt_tokens, row.completion_tokens, cost),
        latency_s=0.0,
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
        await self._service._append_event(self._turn, kind, body)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._turn.prompt_tokens += prompt_tokens
        self._turn.completion_tokens += completion_tokens

    async def history(self) -> list[StoredMessage]:
        return await self._service._history(self._turn)

    async def persist(self, answer: str, notes: dict) -> None:
        await self._service._store_answer(self._turn, answer, notes)
