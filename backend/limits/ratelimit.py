"""Rate limits by GCRA (generic cell rate algorithm) in one Lua script.

One key per principal and operation class holds the "theoretical arrival time". Redis's own
clock (TIME) is the only clock, so any number of API replicas share one limit exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

from backend.config import LimitsSettings, RateSpec
from backend.core.redis import KeySpace
from backend.errors import RateLimited

# KEYS[1]: the TAT key. ARGV: emission interval (microseconds), burst, cost.
# Returns {allowed (0/1), retry_after_us, remaining, reset_after_us}.
_GCRA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - interval * burst
if now < allow_at then
  return {0, allow_at - now, 0, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, math.floor((now - allow_at) / interval), new_tat - now}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float
    reset_after_s: float


class RateLimiter:
    def __init__(self, redis: Redis, keys: KeySpace, settings: LimitsSettings) -> None:
        self._redis = redis
        self._keys = keys.child("rl")
        self._settings = settings
        self._script = redis.register_script(_GCRA)

    def spec(self, plan: str, operation_class: str) -> RateSpec | None:
        rates = self._settings.rates
        return (rates.get(plan) or rates.get(self._settings.default_plan) or {}).get(
            operation_class
        )

    async def check(
        self, subject: str, plan: str, operation_class: str, cost: int = 1
    ) -> Decision | None:
        """Takes `cost` from the subject's allowance; None when no limit applies."""
        spec = self.spec(plan, operation_class)
        if not self._settings.enabled or spec is None:
            return None
        interval_us = max(1, round(1_000_000 / spec.rate_per_s))
        allowed, retry_us, remaining, reset_us = await self._script(
            keys=[self._keys(operation_class, subject)], args=[interval_us, spec.burst, cost]
        )
        return Decision(
            allowed=bool(allowed),
            limit=spec.burst,
            remaining=int(remaining),
            retry_after_s=int(retry_us) / 1_000_000,
            reset_after_s=int(reset_us) / 1_000_000,
        )

    async def enforce(
        self, subject: str, plan: str, operation_class: str, cost: int = 1
    ) -> Decision | None:
        """Like check, but raises RateLimited (with retryAfter) when over the limit."""
        decision = await self.check(subject, plan, operation_class, cost)
        if decision is not None and not decision.allowed:
            raise RateLimited(
                f"rate limit for {operation_class} exceeded",
                retry_after_s=max(0.001, math.ceil(decision.retry_after_s * 1000) / 1000),
                operationClass=operation_class,
                limit=decision.limit,
            )
        return decision
