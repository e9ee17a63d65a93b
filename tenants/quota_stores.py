"""Where quota counters live: Redis (production) or this process (embedded mode).

Both stores implement the same three operations with the same semantics; the services in
``tenants.services.quotas`` talk only to the ``QuotaStore`` protocol, and
``quota_store_get()`` picks the implementation from settings.

Semantics, per tenant:

- Requests per minute: a sliding-window log. A request counts for exactly 60 s after its
  admission; at most ``requests_per_minute`` admissions in any 60 s. (Exact, no burst at a
  window edge; memory is one sorted-set entry per admitted request of the last minute.)
- Tokens per day: one counter per UTC day holding tokens used plus tokens reserved by
  requests in flight. Admission reserves; ``finish`` replaces the reservation with what was
  used (0 to release). A finish after the UTC day changed adjusts nothing: the old day's
  counter is no longer read.
- Concurrent requests: a lease per admitted request, kept until ``finish`` or until it
  expires (``lease_ms``), so a process that crashes mid-request leaks its slot only until
  then. The reservation of an expired lease stays charged (we cannot know what it used).
- One atomic operation checks all three limits and, only when all pass, applies all three;
  a refusal changes no counter. Forgetting entries older than the window, and leases past
  their expiry, is housekeeping done either way.

Time: the Redis store reads the Redis server clock (``TIME``) inside the script, so every
web process agrees on one clock whatever its host's drift; the caller may pass ``now_ms``,
which only tests do, to move the clock.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import redis
from django.conf import settings

WINDOW_MS = 60_000
DAY_MS = 86_400_000

# Refusal reasons, as the store reports them.
REFUSED_REQUESTS = "requests"
REFUSED_TOKENS = "tokens"
REFUSED_CONCURRENCY = "concurrency"
_REFUSALS = {0: None, 1: REFUSED_REQUESTS, 2: REFUSED_TOKENS, 3: REFUSED_CONCURRENCY}
# A refused concurrent request is told to retry after this long: slots free when requests
# finish, which we cannot predict (a lease's expiry is only a crash bound).
CONCURRENCY_RETRY_MS = 1_000


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A tenant's counters as one store operation left them."""

    now_ms: int
    requests_used: int  # admissions in the last 60 s
    requests_oldest_ms: int | None  # admission time of the oldest of them
    requests_newest_ms: int | None  # ... and of the newest
    tokens_used: int  # used + reserved, today (UTC)
    day: int  # UTC day number (days since the epoch) of ``tokens_used``
    in_flight: int  # unexpired leases


@dataclass(frozen=True, slots=True)
class AdmitOutcome:
    admitted: bool
    refused_by: str | None  # REFUSED_* or None
    retry_after_ms: int  # 0 when admitted
    state: QuotaState  # after the admission, or unchanged on a refusal


class QuotaStore(Protocol):
    def admit(
        self,
        *,
        tenant_id: int,
        requests_per_minute: int,
        tokens_per_day: int,
        concurrent_requests: int,
        reserve_tokens: int,
        lease_id: str,
        lease_ms: int,
        now_ms: int | None = None,
    ) -> AdmitOutcome: ...

    def finish(self, *, tenant_id: int, lease_id: str, used_tokens: int) -> bool:
        """End a lease; charge ``used_tokens`` instead of its reservation.

        Returns False (and changes nothing) when the lease is unknown: already finished, or
        expired. So a second settle or release of one admission is harmless.
        """
        ...

    def status(self, *, tenant_id: int, now_ms: int | None = None) -> QuotaState: ...


# --- Redis ---------------------------------------------------------------------------------

# One script for every operation, dispatched on ARGV[1]; each call is atomic.
# KEYS[1] rpm    sorted set: member = lease id, score = admission time (ms)
# KEYS[2] tpd    hash: day = UTC day number, used = tokens used + reserved that day
# KEYS[3] conc   sorted set: member = lease id, score = lease expiry (ms)
# KEYS[4] leases hash: field = lease id, value = "<reserved tokens>:<day>"
# ARGV[2] now in ms, or "" for the server clock.
QUOTA_LUA = """
local op = ARGV[1]
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end
local WINDOW = 60000
local DAY = 86400000
local day = math.floor(now / DAY)
local function fmt(n) return string.format('%d', n) end
local since = '(' .. fmt(now - WINDOW)

local function tokens_used()
  local v = redis.call('HMGET', KEYS[2], 'day', 'used')
  if v[1] and tonumber(v[1]) == day then return tonumber(v[2] or '0') end
  return 0
end

local function state()
  local used = redis.call('ZCOUNT', KEYS[1], since, '+inf')
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local newest = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', since, 'WITHSCORES', 'LIMIT', 0, 1)
  local in_flight = redis.call('ZCOUNT', KEYS[3], '(' .. fmt(now), '+inf')
  return {now, used, tonumber(oldest[2] or '-1'), tonumber(newest[2] or '-1'),
          tokens_used(), day, in_flight}
end

local function reply(status, retry)
  local s = state()
  return {status, retry, s[1], s[2], s[3], s[4], s[5], s[6], s[7]}
end

if op == 'status' then
  return reply(0, 0)
end

if op == 'finish' then
  local lease = ARGV[3]
  local used = tonumber(ARGV[4])
  redis.call('ZREM', KEYS[3], lease)
  local entry = redis.call('HGET', KEYS[4], lease)
  if not entry then return 0 end
  redis.call('HDEL', KEYS[4], lease)
  local reserved, lday = string.match(entry, '^(%d+):(%d+)$')
  if tonumber(redis.call('HGET', KEYS[2], 'day') or '-1') == tonumber(lday) then
    redis.call('HINCRBY', KEYS[2], 'used', used - tonumber(reserved))
  end
  return 1
end

if op ~= 'admit' then
  return redis.error_reply('unknown quota operation ' .. tostring(op))
end

local rpm_limit = tonumber(ARGV[3])
local tpd_limit = tonumber(ARGV[4])
local conc_limit = tonumber(ARGV[5])
local reserve = tonumber(ARGV[6])
local lease = ARGV[7]
local lease_ms = tonumber(ARGV[8])

-- Housekeeping: forget admissions older than the window and leases past their expiry.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - WINDOW))
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', fmt(now))
for _, member in ipairs(expired) do redis.call('HDEL', KEYS[4], member) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now)) end

local used_req = redis.call('ZCARD', KEYS[1])
local used_tok = tokens_used()
local in_flight = redis.call('ZCARD', KEYS[3])

if used_req >= rpm_limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local retry = WINDOW
  if oldest[2] then retry = tonumber(oldest[2]) + WINDOW - now end
  return reply(1, retry)
end
if used_tok + reserve > tpd_limit then
  return reply(2, (day + 1) * DAY - now)
end
if in_flight >= conc_limit then
  return reply(3, 1000)
end

redis.call('ZADD', KEYS[1], now, lease)
redis.call('PEXPIRE', KEYS[1], WINDOW + 1000)
redis.call('HSET', KEYS[2], 'day', day, 'used', used_tok + reserve)
redis.call('PEXPIRE', KEYS[2], 2 * DAY)
redis.call('ZADD', KEYS[3], now + lease_ms, lease)
redis.call('PEXPIRE', KEYS[3], lease_ms + WINDOW)
redis.call('HSET', KEYS[4], lease, fmt(reserve) .. ':' .. fmt(day))
redis.call('PEXPIRE', KEYS[4], lease_ms + WINDOW)
return reply(0, 0)
"""


def _optional_ms(value: int) -> int | None:
    return None if value < 0 else int(value)


class RedisQuotaStore:
    """Quota counters in Redis; correct across any number of processes sharing the server.

    Keys are ``<prefix>:{<tenant id>}:<counter>``: the braces are a Redis Cluster hash tag,
    so one tenant's four keys share a slot and the script may touch them together.
    """

    def __init__(self, *, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._script = client.register_script(QUOTA_LUA)
        self._key_prefix = key_prefix

    def keys_for(self, tenant_id: int) -> list[str]:
        base = f"{self._key_prefix}:{{{tenant_id}}}"
        return [f"{base}:rpm", f"{base}:tpd", f"{base}:conc", f"{base}:leases"]

    def _run(self, tenant_id: int, *args: object) -> object:
        return self._script(keys=self.keys_for(tenant_id), args=list(args))

    @staticmethod
    def _outcome(reply: list[int]) -> AdmitOutcome:
        status, retry, now, used, oldest, newest, tokens, day, in_flight = (int(v) for v in reply)
        return AdmitOutcome(
            admitted=status == 0,
            refused_by=_REFUSALS[status],
            retry_after_ms=max(retry, 0),
            state=QuotaState(
                now_ms=now,
                requests_used=used,
                requests_oldest_ms=_optional_ms(oldest),
                requests_newest_ms=_optional_ms(newest),
                tokens_used=tokens,
                day=day,
                in_flight=in_flight,
            ),
        )

    def admit(
        self,
        *,
        tenant_id: int,
        requests_per_minute: int,
        tokens_per_day: int,
        concurrent_requests: int,
        reserve_tokens: int,
        lease_id: str,
        lease_ms: int,
        now_ms: int | None = None,
    ) -> AdmitOutcome:
        reply = self._run(
            tenant_id,
            "admit",
            "" if now_ms is None else int(now_ms),
            requests_per_minute,
            tokens_per_day,
            concurrent_requests,
            reserve_tokens,
            lease_id,
            lease_ms,
        )
        return self._outcome(reply)  # type: ignore[arg-type]

    def finish(self, *, tenant_id: int, lease_id: str, used_tokens: int) -> bool:
        return bool(self._run(tenant_id, "finish", "", lease_id, used_tokens))

    def status(self, *, tenant_id: int, now_ms: int | None = None) -> QuotaState:
        reply = self._run(tenant_id, "status", "" if now_ms is None else int(now_ms))
        return self._outcome(reply).state  # type: ignore[arg-type]


# --- This process (embedded mode) ------------------------------------------------------------


@dataclass
class _TenantCounters:
    admissions: deque[int] = field(default_factory=deque)  # admission times, oldest first
    token_day: int = -1
    tokens_used: int = 0
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> expiry (ms)
    reservations: dict[str, tuple[int, int]] = field(default_factory=dict)  # -> (tokens, day)


class LocalQuotaStore:
    """The same semantics as ``RedisQuotaStore`` for one process: a lock and dicts.

    Only correct while a single process serves the tenant (the embedded mode).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[int, _TenantCounters] = {}

    @staticmethod
    def _now(now_ms: int | None) -> int:
        return int(time.time() * 1000) if now_ms is None else int(now_ms)

    @staticmethod
    def _forget_old_admissions(counters: _TenantCounters, now: int) -> None:
        while counters.admissions and counters.admissions[0] <= now - WINDOW_MS:
            counters.admissions.popleft()

    @staticmethod
    def _state(counters: _TenantCounters, now: int) -> QuotaState:
        """Call with the lock held, after ``_forget_old_admissions``."""
        live = counters.admissions
        day = now // DAY_MS
        return QuotaState(
            now_ms=now,
            requests_used=len(live),
            requests_oldest_ms=live[0] if live else None,
            requests_newest_ms=live[-1] if live else None,
            tokens_used=counters.tokens_used if counters.token_day == day else 0,
            day=day,
            in_flight=sum(1 for expiry in counters.leases.values() if expiry > now),
        )

    def admit(
        self,
        *,
        tenant_id: int,
        requests_per_minute: int,
        tokens_per_day: int,
        concurrent_requests: int,
        reserve_tokens: int,
        lease_id: str,
        lease_ms: int,
        now_ms: int | None = None,
    ) -> AdmitOutcome:
        now = self._now(now_ms)
        day = now // DAY_MS
        with self._lock:
            counters = self._tenants.setdefault(tenant_id, _TenantCounters())
            self._forget_old_admissions(counters, now)
            for lease, expiry in list(counters.leases.items()):
                if expiry <= now:
                    del counters.leases[lease]
                    counters.reservations.pop(lease, None)
            if counters.token_day != day:
                counters.token_day, counters.tokens_used = day, 0

            refused_by, retry = None, 0
            if len(counters.admissions) >= requests_per_minute:
                refused_by = REFUSED_REQUESTS
                retry = (
                    counters.admissions[0] + WINDOW_MS - now if counters.admissions else WINDOW_MS
                )
            elif counters.tokens_used + reserve_tokens > tokens_per_day:
                refused_by, retry = REFUSED_TOKENS, (day + 1) * DAY_MS - now
            elif len(counters.leases) >= concurrent_requests:
                refused_by, retry = REFUSED_CONCURRENCY, CONCURRENCY_RETRY_MS
            else:
                counters.admissions.append(now)
                counters.tokens_used += reserve_tokens
                counters.leases[lease_id] = now + lease_ms
                counters.reservations[lease_id] = (reserve_tokens, day)
            return AdmitOutcome(
                admitted=refused_by is None,
                refused_by=refused_by,
                retry_after_ms=max(retry, 0),
                state=self._state(counters, now),
            )

    def finish(self, *, tenant_id: int, lease_id: str, used_tokens: int) -> bool:
        with self._lock:
            counters = self._tenants.get(tenant_id)
            if counters is None:
                return False
            counters.leases.pop(lease_id, None)
            reservation = counters.reservations.pop(lease_id, None)
            if reservation is None:
                return False
            reserved, day = reservation
            if counters.token_day == day:
                counters.tokens_used += used_tokens - reserved
            return True

    def status(self, *, tenant_id: int, now_ms: int | None = None) -> QuotaState:
        now = self._now(now_ms)
        with self._lock:
            counters = self._tenants.get(tenant_id) or _TenantCounters()
            self._forget_old_admissions(counters, now)
            return self._state(counters, now)


# --- Choosing one -------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def redis_client_for(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process; redis-py resets it after fork."""
    return redis.Redis.from_url(url)


@functools.lru_cache(maxsize=16)
def _quota_store_build(backend: str, redis_url: str, key_prefix: str) -> QuotaStore:
    if backend == "redis":
        if not redis_url:
            raise RuntimeError("QUOTA_BACKEND is 'redis' but REDIS_URL is not set")
        return RedisQuotaStore(client=redis_client_for(redis_url), key_prefix=key_prefix)
    if backend == "local":
        return LocalQuotaStore()
    raise RuntimeError(f"Unknown QUOTA_BACKEND {backend!r} (use 'redis' or 'local')")


def quota_store_get() -> QuotaStore:
    """The store settings ask for: Redis when ``REDIS_URL`` is set, else this process.

    ``QUOTA_BACKEND`` ("redis" / "local") forces one; ``QUOTA_KEY_PREFIX`` (default
    "quota") namespaces the Redis keys, and gives a fresh local store per prefix.
    """
    redis_url = getattr(settings, "REDIS_URL", "") or ""
    backend = getattr(settings, "QUOTA_BACKEND", "") or ("redis" if redis_url else "local")
    key_prefix = getattr(settings, "QUOTA_KEY_PREFIX", "quota")
    return _quota_store_build(backend, redis_url, key_prefix)
