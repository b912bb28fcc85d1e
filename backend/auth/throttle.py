"""Failed sign-ins, limited so that guessing is slow and no one can lock a victim out.

Three limits, all in one Lua script on Redis's clock (exact across replicas, and parallel
guesses cannot slip past a check-then-count race: every attempt is counted as a failure
before the password is checked, and given back when it was right):

- per account and source address: a few free attempts, then an exponential backoff between
  attempts (capped). Only that source waits; a victim elsewhere is not touched, and a victim
  who mistyped waits seconds, not a quarter of an hour.
- per source address, over all accounts: password spraying from one address is refused.
- per account, over all sources: a distributed attack refuses further attempts from sources
  that never signed in to the account, while sources that did (within the trust period) keep
  their own limits only. One address cannot trip this: its own backoff stops it long before.

A source is the client address; IPv6 addresses count per /64 (one host is usually given one).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from redis.asyncio import Redis

from backend.config import AuthSettings
from backend.core.redis import KeySpace

# KEYS: 1 pair (account, source) hash {n, next}; 2 source failures; 3 account failures;
# 4 trusted marker of the pair. ARGV: free, base_ms, max_ms, window_s, source_limit,
# account_limit. Returns {verdict, wait_ms}: 0 allowed, 1 source, 2 pair backoff, 3 account.
_RESERVE = """
local free = tonumber(ARGV[1])
local base = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[5]) then
  return {1, math.max(redis.call('PTTL', KEYS[2]), 1)}
end
local trusted = redis.call('EXISTS', KEYS[4]) == 1
if not trusted and tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[6]) then
  return {3, math.max(redis.call('PTTL', KEYS[3]), 1)}
end
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local next_at = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
if now < next_at then
  return {2, next_at - now}
end
n = n + 1
local delay = 0
if n >= free then
  delay = math.min(base * 2 ^ (n - free), cap)
end
redis.call('HSET', KEYS[1], 'n', n, 'next', now + delay)
redis.call('EXPIRE', KEYS[1], window)
for i = 2, 3 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], window, 'NX')
end
return {0, 0}
"""

# A right password: the attempt is given back, the pair starts afresh, the source is trusted.
# KEYS as above. ARGV: trust_s.
_RELEASE = """
redis.call('DEL', KEYS[1])
for i = 2, 3 do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then
    redis.call('DECR', KEYS[i])
  end
end
redis.call('SET', KEYS[4], '1', 'EX', tonumber(ARGV[1]))
return 1
"""


class Limit(StrEnum):
    """Which limit refused an attempt (audited)."""

    SOURCE = "source"
    ACCOUNT_SOURCE = "account_source"
    ACCOUNT = "account"


_VERDICTS = {1: Limit.SOURCE, 2: Limit.ACCOUNT_SOURCE, 3: Limit.ACCOUNT}


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: Limit
    retry_after_s: float


def source_of(ip: str | None) -> str:
    """The throttled unit of a client address: the address, or its /64 for IPv6."""
    if not ip:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LoginThrottle:
    def __init__(self, redis: Redis, keys: KeySpace, settings: AuthSettings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)

    @staticmethod
    def _account(tenant: str, email: str) -> str:
        # Hashed: the key's length does not depend on what a client typed.
        return hashlib.sha256(f"{tenant.lower()}\0{email.lower()}".encode()).hexdigest()[:32]

    def _key_list(self, tenant: str, email: str, ip: str | None) -> list[str]:
        account = self._account(tenant, email)
        source = source_of(ip)
        return [
            self._keys("pair", account, source),
            self._keys("source", source),
            self._keys("account", account),
            self._keys("trusted", account, source),
        ]

    async def attempt(self, tenant: str, email: str, ip: str | None) -> Refusal | None:
        """Counts one attempt as a failure (until `succeeded`), or says which limit refuses it."""
        s = self._settings
        verdict, wait_ms = await self._reserve(
            keys=self._key_list(tenant, email, ip),
            args=[
                s.login_free_attempts,
                round(s.login_backoff_base_s * 1000),
                round(s.login_backoff_max_s * 1000),
                s.login_window_s,
                s.login_source_failures,
                s.login_account_failures,
            ],
        )
        if int(verdict) == 0:
            return None
        return Refusal(_VERDICTS[int(verdict)], int(wait_ms) / 1000)

    async def forget(self, tenant: str, email: str) -> None:
        """Drops an account's counters and trusted sources (its user is erased). Rare: the
        per-source keys of the account are found with SCAN."""
        account = self._account(tenant, email)
        names = [self._keys("account", account)]
        for kind in ("pair", "trusted"):
            names += [
                key async for key in self._redis.scan_iter(match=self._keys(kind, account, "*"))
            ]
        await self._redis.delete(*names)

    async def succeeded(self, tenant: str, email: str, ip: str | None) -> None:
        """The attempt had the right password: it is not a failure, and its source is trusted."""
        await self._release(
            keys=self._key_list(tenant, email, ip), args=[self._settings.login_trusted_source_s]
        )
