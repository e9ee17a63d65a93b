"""Types and constants shared by the quota stores (see ``tenants.quota_stores``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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
