"""Token and compute budgets: reserved before a run, charged as it streams, settled at the end.

Counters live in Redis (one Lua script per step, so concurrent runs on any replica never
overspend together); settled amounts are recorded durably as usage records in PostgreSQL.
Each budget is four counters: tenant per day and per month, user per day and per month.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import BudgetSpec, LimitsSettings
from backend.core.models import UsageRecord
from backend.core.redis import KeySpace
from backend.errors import AppError

_DAY_TTL_S = 2 * 86_400
_MONTH_TTL_S = 32 * 86_400
_SCOPES = ("tenant per day", "tenant per month", "user per day", "user per month")

# KEYS: used[1..4], held[1..4]. ARGV: limit[1..4] (0 = none), amount, ttl day, ttl month.
# Reserves `amount` on all four or none; returns {1} or {0, failing index, available}.
_RESERVE = """
local amount = tonumber(ARGV[5])
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local used = tonumber(redis.call('GET', KEYS[i]) or 0)
    local held = tonumber(redis.call('GET', KEYS[i + 4]) or 0)
    if used + held + amount > limit then
      return {0, i, tostring(math.max(0, limit - used - held))}
    end
  end
end
for i = 1, 4 do
  local ttl = (i % 2 == 1) and ARGV[6] or ARGV[7]
  redis.call('INCRBYFLOAT', KEYS[i + 4], amount)
  redis.call('EXPIRE', KEYS[i + 4], ttl)
end
return {1}
"""

# ARGV: limit[1..4], amount used, amount released from the hold, ttl day, ttl month.
# Returns {exhausted (0/1), index of the tightest counter, remaining there}.
_CHARGE = """
local used_amount = tonumber(ARGV[5])
local release = tonumber(ARGV[6])
local exhausted, tightest, least = 0, 0, nil
for i = 1, 4 do
  local ttl = (i % 2 == 1) and ARGV[7] or ARGV[8]
  local used = tonumber(redis.call('INCRBYFLOAT', KEYS[i], used_amount))
  redis.call('EXPIRE', KEYS[i], ttl)
  if release > 0 then
    local held = tonumber(redis.call('GET', KEYS[i + 4]) or 0)
    redis.call('SET', KEYS[i + 4], tostring(math.max(0, held - release)), 'EX', ttl)
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


class Resource(StrEnum):
    LLM_TOKENS = "llm_tokens"
    COMPUTE_SECONDS = "compute_seconds"


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
    settled: bool = field(default=False, repr=False)

    async def charge(self, amount: float) -> float:
        """Adds consumption; returns what is left on the tightest counter.

        Raises BudgetExceeded once a counter is used up: the caller stops its run there.
        """
        release = min(amount, max(0.0, self.held - self.charged))
        self.charged += amount
        exhausted, index, least = await self.budgets._charge(
            keys=self.keys, args=[*self.limits, amount, release, _DAY_TTL_S, _MONTH_TTL_S]
        )
        left = float(least)
        if int(exhausted):
            raise BudgetExceeded(
                f"{self.resource.value} budget ({_SCOPES[int(index) - 1]}) is used up",
                resource=self.resource.value,
                scope=_SCOPES[int(index) - 1],
            )
        return left

    async def release(self) -> bool:
        """Gives back what is held and not used, once; records nothing (True the first time)."""
        if self.settled:
            return False
        self.settled = True
        unused = max(0.0, self.held - self.charged)
        if unused:
            await self.budgets._charge(
                keys=self.keys, args=[*self.limits, 0, unused, _DAY_TTL_S, _MONTH_TTL_S]
            )
        return True

    async def settle(
        self,
        session: AsyncSession,
        cost_per_unit: Decimal = Decimal(0),
        cost: Decimal | None = None,
    ) -> None:
        """Releases the unused hold and records the usage (in the caller's unit of work);
        `cost` is the total when the price is not per unit (prompt and completion tokens)."""
        if not await self.release():
            return
        amount = Decimal(str(self.charged))
        session.add(
            UsageRecord(
                tenant_id=self.tenant_id,
                user_id=self.user_id,
                resource=self.resource.value,
                subject=self.subject,
                amount=amount,
                cost=amount * cost_per_unit if cost is None else cost,
            )
        )
        await session.flush()


class Budgets:
    def __init__(self, redis: Redis, keys: KeySpace, settings: LimitsSettings) -> None:
        self._keys = keys.child("budget")
        self._settings = settings
        self._reserve = redis.register_script(_RESERVE)
        self._charge = redis.register_script(_CHARGE)

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

    async def reserve(
        self,
        *,
        tenant_id: uuid.UUID,
        user_id: uuid.UUID | None,
        plan: str,
        resource: Resource,
        amount: float,
        subject: str,
    ) -> Reservation:
        """Holds `amount` against all four counters, or raises BudgetExceeded."""
        spec = self.spec(plan, resource)
        limits = [spec.tenant_day, spec.tenant_month, spec.user_day, spec.user_month]
        if not self._settings.enabled:
            limits = [0.0, 0.0, 0.0, 0.0]
        if user_id is None:
            limits[2] = limits[3] = 0.0
        keys = self._counter_keys(tenant_id, user_id, resource)
        result = await self._reserve(keys=keys, args=[*limits, amount, _DAY_TTL_S, _MONTH_TTL_S])
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
        )
