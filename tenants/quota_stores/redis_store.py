"""The Redis quota store: one Lua script, atomic per call (see ``tenants.quota_stores``).

Every operation may be sent twice (the client retries connection errors,
``tenants.redis_options``): ``admit`` is idempotent per lease id, ``finish`` per lease,
``status`` reads only.
"""

from __future__ import annotations

import functools

import redis
from redis.typing import EncodableT

from tenants.quota_stores.base import _REFUSALS, AdmitOutcome, QuotaState
from tenants.redis_options import redis_options_from_settings

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

-- Idempotent per lease id: a client that retries after losing the reply (a connection
-- error) finds its lease taken and is admitted, without a second reservation.
if redis.call('HEXISTS', KEYS[4], lease) == 1 then
  return reply(0, 0)
end

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

    def _run(self, tenant_id: int, *args: EncodableT) -> object:
        return self._script(keys=self.keys_for(tenant_id), args=list(args))

    def _run_for_state(self, tenant_id: int, *args: EncodableT) -> list[int]:
        """``admit`` and ``status``: the script answers the nine integers of its ``reply``."""
        # redis-py leaves Script.__call__'s result unannotated (Any); the annotation is the
        # script's reply, Lua numbers arriving as Redis integers.
        reply: list[int] = self._script(keys=self.keys_for(tenant_id), args=list(args))
        return reply

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
        reply = self._run_for_state(
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
        return self._outcome(reply)

    def finish(self, *, tenant_id: int, lease_id: str, used_tokens: int) -> bool:
        return bool(self._run(tenant_id, "finish", "", lease_id, used_tokens))

    def status(self, *, tenant_id: int, now_ms: int | None = None) -> QuotaState:
        reply = self._run_for_state(tenant_id, "status", "" if now_ms is None else int(now_ms))
        return self._outcome(reply).state


@functools.lru_cache(maxsize=4)
def redis_client_for(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process; redis-py resets it after fork.

    Opened with the web side's timeouts, health checks and retries (``REDIS_*`` settings).
    """
    return redis.Redis.from_url(url, **redis_options_from_settings())
