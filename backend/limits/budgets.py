"""Token and compute budgets: reserved before a run, charged as it streams, settled at the end.

Counters live in Redis (one Lua script per step, so concurrent runs on any replica never
overspend together); settled amounts are recorded durably as usage records in PostgreSQL.
Each budget is four counters: tenant per day and per month, user per day and per month.

A reservation made with a `hold_id` is also recorded in Redis (what is held, what is charged),
so that when the replica holding it dies, the one that recovers its work can settle it: what
was used stays counted, the rest of the hold is given back. Charges to such a reservation are
idempotent (each names the total charged so far), so a charge retried after a lost reply
counts once.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import BudgetSpec, LimitsSettings
from backend.core.redis import KeySpace, ScriptedPipeline
from backend.errors import AppError
from backend.limits.usage import UsagePart, add_usage

_DAY_TTL_S = 2 * 86_400
_MONTH_TTL_S = 32 * 86_400
_SCOPES = ("tenant per day", "tenant per month", "user per day", "user per month")

# KEYS: used[1..4], held[1..4], [the reservation's record]. ARGV: limit[1..4] (0 = none),
# amount, ttl day, ttl month, [the record's spec]. Reserves `amount` on all four or none
# (an amount of 0 holds nothing: it is refused once a counter is used up); returns {1} or
# {0, failing index, available}.
_RESERVE = """
local amount = tonumber(ARGV[5])
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local used = tonumber(redis.call('GET', KEYS[i]) or 0)
    local held = tonumber(redis.call('GET', KEYS[i + 4]) or 0)
    if used + held + amount > limit or (amount == 0 and used + held >= limit) then
      return {0, i, tostring(math.max(0, limit - used - held))}
    end
  end
end
if amount > 0 then
  for i = 1, 4 do
    local ttl = (i % 2 == 1) and ARGV[6] or ARGV[7]
    redis.call('INCRBYFLOAT', KEYS[i + 4], amount)
    redis.call('EXPIRE', KEYS[i + 4], ttl)
  end
end
if #KEYS >= 9 then
  redis.call('HSET', KEYS[9], 'held', ARGV[5], 'charged', '0', 'spec', ARGV[8])
  redis.call('EXPIRE', KEYS[9], ARGV[7])
end
return {1}
"""

# KEYS: as _RESERVE. ARGV: limit[1..4], amount used, amount released from the hold, ttl day,
# ttl month, [the total charged with this call, when there is a record: then what is used and
# released comes from the record, and a repeated call adds nothing]. Returns {exhausted (0/1),
# index of the tightest counter, remaining there}.
_CHARGE = """
-- What is left of a hold: float dust (a hold's parts given back in another order, or its
-- amount printed to 14 digits by tostring) is nothing, so a settled hold reads 0.
local function settled(v)
  if v < 1e-9 then return 0 end
  return v
end
local used_amount = tonumber(ARGV[5])
local release = tonumber(ARGV[6])
if #KEYS >= 9 then
  release = 0
  if redis.call('EXISTS', KEYS[9]) == 1 then
    local charged = tonumber(redis.call('HGET', KEYS[9], 'charged'))
    local held = tonumber(redis.call('HGET', KEYS[9], 'held'))
    local total = tonumber(ARGV[9])
    used_amount = math.max(0, total - charged)
    release = math.min(used_amount, math.max(0, held - charged))
    redis.call('HSET', KEYS[9], 'charged', tostring(math.max(charged, total)))
  end
end
local exhausted, tightest, least = 0, 0, nil
for i = 1, 4 do
  local ttl = (i % 2 == 1) and ARGV[7] or ARGV[8]
  local used = tonumber(redis.call('INCRBYFLOAT', KEYS[i], used_amount))
  redis.call('EXPIRE', KEYS[i], ttl)
  if release > 0 then
    local held = tonumber(redis.call('GET', KEYS[i + 4]) or 0)
    redis.call('SET', KEYS[i + 4], tostring(settled(held - release)), 'EX', ttl)
  end
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local left = limit - used
    if least == nil or left < least then least, tightest = left, i end
    if left <= 0 then exhausted = 1 end
  end
end
return {exhausted, tightest, tostring(least or -1)}
"""

# KEYS: as _RESERVE (with the record). ARGV: ttl day, ttl month. Gives back what the record
# holds and has not used, and deletes it; 1 the first time, 0 when it was settled already.
_RELEASE = """
-- What is left of a hold: float dust (a hold's parts given back in another order, or its
-- amount printed to 14 digits by tostring) is nothing, so a settled hold reads 0.
local function settled(v)
  if v < 1e-9 then return 0 end
  return v
end
if redis.call('EXISTS', KEYS[9]) == 0 then return 0 end
local held = tonumber(redis.call('HGET', KEYS[9], 'held'))
local charged = tonumber(redis.call('HGET', KEYS[9], 'charged'))
local unused = math.max(0, held - charged)
if unused > 0 then
  for i = 1, 4 do
    local ttl = (i % 2 == 1) and ARGV[1] or ARGV[2]
    local left = tonumber(redis.call('GET', KEYS[i + 4]) or 0)
    redis.call('SET', KEYS[i + 4], tostring(settled(left - unused)), 'EX', ttl)
  end
end
redis.call('DEL', KEYS[9])
return 1
"""


class Resource(StrEnum):
    LLM_TOKENS = "llm_tokens"
    COMPUTE_SECONDS = "compute_seconds"
    COST = "cost"  # money, charged by every kind of model (chat, vision, embedding)


class BudgetExceeded(AppError):
    code = "BUDGET_EXCEEDED"
    status = 429


@dataclass
class Reservation:
    """A run's hold on a budget; charge as it consumes, settle exactly once at the end."""

    budgets: Budgets
    tenant_id: uuid.UUID
    user_id: uuid.UUID | None
    resource: Resource
    subject: str
    held: float
    limits: list[float]
    keys: list[str]
    charged: float = 0.0
    record: str | None = None  # where the reservation is recorded in Redis (see the module)
    settled: bool = field(default=False, repr=False)
    _usage_due: bool = field(default=False, repr=False)

    async def charge(self, amount: float) -> float:
        """Adds consumption; returns what is left on the tightest counter.

        Raises BudgetExceeded once a counter is used up: the caller stops its run there.
        """
        keys, args = self._charge_call(amount)
        return self._charged(amount, await self.budgets._charge(keys=keys, args=args))

    def _charge_call(self, amount: float) -> tuple[list[str], list[float]]:
        release = min(amount, max(0.0, self.held - self.charged))
        keys: list[str] = self.keys
        args: list[float] = [*self.limits, amount, release, _DAY_TTL_S, _MONTH_TTL_S]
        if self.record is not None:  # the same call again (its reply was lost) adds nothing
            keys, args = [*keys, self.record], [*args, self.charged + amount]
        return keys, args

    def _charged(self, amount: float, result: list) -> float:
        exhausted, index, least = result
        self.charged += amount
        left = float(least)
        if int(index) and self.limits[int(index) - 1] > 0 and self.budgets.metrics is not None:
            self.budgets.metrics.budget_left(
                self.tenant_id,
                self.resource.value,
                _SCOPES[int(index) - 1].replace(" per ", "_"),
                max(0.0, left) / self.limits[int(index) - 1],
            )
        if int(exhausted):
            raise BudgetExceeded(
                f"{self.resource.value} budget ({_SCOPES[int(index) - 1]}) is used up",
                resource=self.resource.value,
                scope=_SCOPES[int(index) - 1],
            )
        return left

    async def release(self) -> bool:
        """Gives back what is held and not used, once; records nothing (True the first time;
        with a record, only for the first of every replica that releases it)."""
        if self.settled:
            return False
        call = self._release_call()
        return self._released(None if call is None else await call[0](keys=call[1], args=call[2]))

    def _release_call(
        self, pending: float = 0.0
    ) -> tuple[AsyncScript, list[str], list[Any]] | None:
        """The script, keys and arguments that release the hold (None: nothing to give back).
        `pending`: charged in the same round trip, before (it uses that much of the hold)."""
        if self.record is not None:
            return self.budgets._release, [*self.keys, self.record], [_DAY_TTL_S, _MONTH_TTL_S]
        unused = max(0.0, self.held - self.charged - pending)
        if not unused:
            return None
        return self.budgets._charge, self.keys, [*self.limits, 0, unused, _DAY_TTL_S, _MONTH_TTL_S]

    def _released(self, reply: Any) -> bool:
        """The release's reply: whether this was the first (see `release`)."""
        self.settled = True
        return bool(int(reply)) if self.record is not None else True

    async def settle(
        self,
        session: AsyncSession,
        cost_per_unit: Decimal = Decimal(0),
        cost: Decimal | None = None,
        *,
        served_by: tuple[str, str, str] | None = None,
        parts: list[UsagePart] | None = None,
    ) -> None:
        """Releases the unused hold and records the usage (in the caller's unit of work);
        `cost` is the total when the price is not per unit (prompt and completion tokens);
        `served_by` names the model, version and kind that consumed it all; `parts`, when
        given, are recorded one by one instead (what each model version took).

        Call it again only when that unit of work failed (the usage is then recorded in the
        next one); the hold is released once."""
        if await self.release():
            self._usage_due = True
        if not self._usage_due:
            return
        if not parts:  # no part (a job whose every task failed): what was charged, unnamed
            amount = Decimal(str(self.charged))
            model, version, kind = served_by or ("", "", "")
            total = amount * cost_per_unit if cost is None else cost
            parts = [UsagePart(model, version, kind, amount, total)]
        add_usage(
            session,
            tenant_id=self.tenant_id,
            user_id=self.user_id,
            resource=self.resource.value,
            subject=self.subject,
            parts=parts,
        )
        await session.flush()


class BudgetMetrics(Protocol):
    def budget_left(self, tenant: object, resource: str, scope: str, fraction: float) -> None: ...


class Budgets:
    def __init__(
        self,
        redis: Redis,
        keys: KeySpace,
        settings: LimitsSettings,
        metrics: BudgetMetrics | None = None,
    ) -> None:
        self.metrics = metrics  # told what is left after each charge (no extra round trip)
        self._keys = keys.child("budget")
        self._settings = settings
        self._redis = redis
        self._reserve = redis.register_script(_RESERVE)
        self._charge = redis.register_script(_CHARGE)
        self._release = redis.register_script(_RELEASE)

    async def charge_together(self, charges: list[tuple[Reservation, float]]) -> None:
        """Charges several reservations in one round trip (a run's tokens and their money);
        raises BudgetExceeded for the first one used up (all are charged first)."""
        calls = ScriptedPipeline(self._redis)
        for reservation, amount in charges:
            calls.script(self._charge, *reservation._charge_call(amount))
        results = await calls.execute()
        exceeded: BudgetExceeded | None = None
        for (reservation, amount), result in zip(charges, results, strict=True):
            try:
                reservation._charged(amount, result)
            except BudgetExceeded as exc:
                exceeded = exceeded or exc
        if exceeded is not None:
            raise exceeded

    async def close(self, owed: list[tuple[Reservation, float]]) -> None:
        """The end of the work the reservations were for, in one round trip: each is charged
        what it still owes (nothing for 0) and its hold is released. A budget this uses up is
        no error (the work is over; the next is refused). `settle` then records the usage with
        no round trip of its own."""
        calls = ScriptedPipeline(self._redis)
        open_ = [(r, amount) for r, amount in owed if not r.settled]
        charged = [
            (r, amount, calls.script(self._charge, *r._charge_call(amount)))
            for r, amount in open_
            if amount > 0
        ]
        released = []
        for r, amount in open_:
            call = r._release_call(pending=max(0.0, amount))
            released.append((r, None if call is None else calls.script(*call)))
        replies = await calls.execute()
        for r, amount, index in charged:
            with contextlib.suppress(BudgetExceeded):
                r._charged(amount, replies[index])
        for r, index in released:
            if r._released(None if index is None else replies[index]):
                r._usage_due = True

    async def charge_with_money(
        self, tokens: Reservation, money: Reservation | None, amount: float, cost: float
    ) -> None:
        """Charges `amount` tokens and their `cost` to the money budget in one round trip (the
        tokens alone when they cost nothing); raises BudgetExceeded as `charge_together`."""
        if cost <= 0 or money is None:
            await tokens.charge(amount)
            return
        await self.charge_together([(tokens, amount), (money, cost)])

    async def admit(
        self,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        subject: str,
        hold_id: str | None = None,
    ) -> Reservation:
        """The money budget's reservation of a run or job: it holds nothing (what a run will
        cost is not known), and is refused (BudgetExceeded) once the money is spent. With
        `hold_id` it is recorded, as `reserve` says: its charges count once however often they
        are retried, and the replica that recovers the work charges what was not."""
        return await self.reserve(
            tenant_id=tenant_id,
            user_id=user_id,
            plan=plan,
            resource=Resource.COST,
            amount=0,
            subject=subject,
            hold_id=hold_id,
        )

    def admit_in(
        self,
        calls: ScriptedPipeline,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        subject: str,
        hold_id: str | None = None,
    ) -> Callable[[list[Any]], Reservation]:
        """`admit` queued on a pipeline, as `reserve_in`."""
        return self.reserve_in(
            calls,
            tenant_id=tenant_id,
            user_id=user_id,
            plan=plan,
            resource=Resource.COST,
            amount=0,
            subject=subject,
            hold_id=hold_id,
        )

    async def admit_and_reserve(
        self,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        resource: Resource,
        amount: float,
        subject: str,
    ) -> tuple[Reservation, Reservation]:
        """`admit` (money) and `reserve` (`amount` of `resource`) in one round trip: the money
        admission and the hold. Refused (BudgetExceeded, the money's first) with nothing held."""
        calls = ScriptedPipeline(self._redis)
        asked = {"tenant_id": tenant_id, "user_id": user_id, "plan": plan, "subject": subject}
        admitted = self.admit_in(calls, **asked)
        reserved = self.reserve_in(calls, resource=resource, amount=amount, **asked)
        replies = await calls.execute()
        try:
            money = admitted(replies)
        except BudgetExceeded:
            with contextlib.suppress(BudgetExceeded):
                await reserved(replies).release()
            raise
        return money, reserved(replies)

    async def charge(
        self,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        resource: Resource,
        amount: float,
        subject: str,
    ) -> float:
        """Charges what was consumed without a reservation before it (one round trip: a search's
        query embedding); raises BudgetExceeded once a counter is used up."""
        limits = self._limits(plan, resource, user_id)
        keys = self._counter_keys(tenant_id, user_id, resource)
        once = Reservation(self, tenant_id, user_id, resource, subject, 0.0, limits, keys)
        return await once.charge(amount)

    def _limits(self, plan: str, resource: Resource, user_id: uuid.UUID | None) -> list[float]:
        spec = self.spec(plan, resource)
        limits = [spec.tenant_day, spec.tenant_month, spec.user_day, spec.user_month]
        if not self._settings.enabled:
            limits = [0.0, 0.0, 0.0, 0.0]
        if user_id is None:
            limits[2] = limits[3] = 0.0
        return limits

    def spec(self, plan: str, resource: Resource) -> BudgetSpec:
        budgets = self._settings.budgets
        plan_budgets = budgets.get(plan) or budgets.get(self._settings.default_plan) or {}
        return plan_budgets.get(resource.value) or BudgetSpec()

    def _counter_keys(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID | None, resource: Resource
    ) -> list[str]:
        now = datetime.now(UTC)
        day, month = now.strftime("%Y%m%d"), now.strftime("%Y%m")
        # The {tenant} hash tag keeps all of a tenant's counters in one Redis Cluster slot.
        base = f"{{{tenant_id}}}:{resource.value}"
        user = str(user_id or "none")
        used = [
            self._keys(base, "t", day),
            self._keys(base, "t", month),
            self._keys(base, "u", user, day),
            self._keys(base, "u", user, month),
        ]
        return used + [key + ":held" for key in used]

    def _record_key(self, tenant_id: uuid.UUID, resource: Resource, hold_id: str) -> str:
        return self._keys(f"{{{tenant_id}}}:{resource.value}", "hold", hold_id)

    async def recover(
        self, *, tenant_id: uuid.UUID, user_id: uuid.UUID | None, resource: Resource, hold_id: str
    ) -> Reservation | None:
        """The reservation recorded under `hold_id` (made by a replica that died), or None
        when there is none (settled, or never made)."""
        record = self._record_key(tenant_id, resource, hold_id)
        raw = {_text(k): _text(v) for k, v in (await self._redis.hgetall(record)).items()}
        if not raw:
            return None
        spec = json.loads(raw["spec"])
        return Reservation(
            budgets=self,
            tenant_id=tenant_id,
            user_id=user_id,
            resource=resource,
            subject=spec["subject"],
            held=float(raw["held"]),
            limits=[float(x) for x in spec["limits"]],
            keys=list(spec["keys"]),
            charged=float(raw["charged"]),
            record=record,
        )

    async def reserve(
        self,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        resource: Resource,
        amount: float,
        subject: str,
        hold_id: str | None = None,
    ) -> Reservation:
        """Holds `amount` against all four counters, or raises BudgetExceeded. With `hold_id`,
        the reservation is recorded (see `recover`)."""
        keys, args, reserved = self._reserve_call(
            tenant_id=tenant_id,
            user_id=user_id,
            plan=plan,
            resource=resource,
            amount=amount,
            subject=subject,
            hold_id=hold_id,
        )
        return reserved(await self._reserve(keys=keys, args=args))

    def reserve_in(
        self,
        calls: ScriptedPipeline,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        resource: Resource,
        amount: float,
        subject: str,
        hold_id: str | None = None,
    ) -> Callable[[list[Any]], Reservation]:
        """`reserve` queued on a pipeline, to go with other commands in one round trip.
        Returns what makes the pipeline's replies the Reservation (or raises BudgetExceeded):
        a refused reservation holds nothing, one made holds until released."""
        keys, args, reserved = self._reserve_call(
            tenant_id=tenant_id,
            user_id=user_id,
            plan=plan,
            resource=resource,
            amount=amount,
            subject=subject,
            hold_id=hold_id,
        )
        index = calls.script(self._reserve, keys, args)
        return lambda replies: reserved(replies[index])

    def _reserve_call(
        self,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        resource: Resource,
        amount: float,
        subject: str,
        hold_id: str | None,
    ) -> tuple[list[str], list[Any], Callable[[list[Any]], Reservation]]:
        """The reserve script's keys and arguments, and what turns its reply into the
        Reservation (or BudgetExceeded)."""
        limits = self._limits(plan, resource, user_id)
        keys = self._counter_keys(tenant_id, user_id, resource)
        record = self._record_key(tenant_id, resource, hold_id) if hold_id else None
        recorded = json.dumps({"subject": subject, "limits": limits, "keys": keys})

        def reserved(result: list[Any]) -> Reservation:
            if not int(result[0]):
                scope = _SCOPES[int(result[1]) - 1]
                raise BudgetExceeded(
                    f"{resource.value} budget ({scope}) cannot cover {amount:g}",
                    resource=resource.value,
                    scope=scope,
                    available=float(result[2]),
                )
            return Reservation(
                budgets=self,
                tenant_id=tenant_id,
                user_id=user_id,
                resource=resource,
                subject=subject,
                held=amount,
                limits=limits,
                keys=keys,
                record=record,
            )

        return (
            [*keys, record] if record else keys,
            [*limits, amount, _DAY_TTL_S, _MONTH_TTL_S, recorded],
            reserved,
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
