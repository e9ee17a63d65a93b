"""The process-local quota store for embedded mode (see ``tenants.quota_stores``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from tenants.quota_stores.base import (
    CONCURRENCY_RETRY_MS,
    DAY_MS,
    REFUSED_CONCURRENCY,
    REFUSED_REQUESTS,
    REFUSED_TOKENS,
    WINDOW_MS,
    AdmitOutcome,
    QuotaState,
)

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
