"""Quotas: the same behaviour from the Redis store and the process-local (embedded) store."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from tenants.errors import ApplicationError
from tenants.principals import EffectiveLimits
from tenants.quota_stores import (
    DAY_MS,
    LocalQuotaStore,
    RedisQuotaStore,
    quota_store_get,
    redis_client_for,
)
from tenants.services.quotas import (
    RATE_LIMIT_HEADER_NAMES,
    duration_format,
    quota_admit,
    quota_release,
    quota_settle,
    quota_status,
)

LIMITS = EffectiveLimits(
    requests_per_minute=100,
    tokens_per_day=1_000_000,
    concurrent_requests=100,
    max_image_bytes=5 * 1024 * 1024,
    max_output_tokens=1024,
    allowed_models=("glm-4.6v-flash",),
    fallback_model=None,
)
TENANT = 41
# A fixed clock for the store-level tests: 2030-01-01T00:00:10Z in ms.
T0 = 1_893_456_010_000


@pytest.fixture(params=["redis", "local"])
def backend(request, settings) -> str:
    """Run the test on each store; "local" is the embedded mode's store."""
    if request.param == "redis":
        assert settings.REDIS_URL, "the Redis store's tests need REDIS_URL"
    settings.QUOTA_BACKEND = request.param
    return request.param


def _refusal(limits: EffectiveLimits, reserve_tokens: int = 0) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=reserve_tokens)
    return caught.value


def _admit_or_code(limits: EffectiveLimits, reserve_tokens: int = 0) -> str:
    try:
        quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=reserve_tokens)
    except ApplicationError as error:
        return error.code
    return "admitted"


def test_the_store_follows_settings(settings):
    settings.QUOTA_BACKEND = ""
    assert isinstance(quota_store_get(), RedisQuotaStore)  # REDIS_URL is set in these runs
    settings.REDIS_URL = ""
    assert isinstance(quota_store_get(), LocalQuotaStore)


def test_requests_per_minute_admits_the_limit_then_refuses(backend):
    limits = replace(LIMITS, requests_per_minute=3)
    admissions = [quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=0) for _ in range(3)]

    refusal = _refusal(limits)

    assert [a.status.remaining_requests for a in admissions] == [2, 1, 0]
    assert refusal.status == 429
    assert refusal.code == "rate_limit_exceeded"
    assert refusal.type == "rate_limit_error"
    assert set(RATE_LIMIT_HEADER_NAMES) <= set(refusal.headers)
    assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refusal.headers["retry-after"]) <= 60


def test_the_request_window_slides(backend):
    store = quota_store_get()

    def admit(now_ms: int, limit: int = 2):
        return store.admit(
            tenant_id=TENANT,
            requests_per_minute=limit,
            tokens_per_day=10**9,
            concurrent_requests=10**6,
            reserve_tokens=0,
            lease_id=f"lease-{now_ms}",
            lease_ms=1,
            now_ms=now_ms,
        )

    assert admit(T0).admitted
    assert admit(T0 + 30_000).admitted
    refused = admit(T0 + 59_999)
    assert refused.refused_by == "requests"
    assert refused.retry_after_ms == 1  # the first admission leaves the window in 1 ms
    assert admit(T0 + 60_001).admitted  # ... and has left it
    assert admit(T0 + 60_002).refused_by == "requests"  # the one at T0 + 30 s still counts
    assert store.status(tenant_id=TENANT, now_ms=T0 + 60_002).requests_used == 2


def test_tokens_reserve_then_settle_to_what_was_used(backend):
    limits = replace(LIMITS, tokens_per_day=1000)

    admission = quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=500)
    assert admission.status.remaining_tokens == 500
    assert quota_settle(admission=admission, used_tokens=120)

    status = quota_status(tenant_id=TENANT, limits=limits)
    assert status.remaining_tokens == 880
    assert status.in_flight == 0
    assert not quota_settle(admission=admission, used_tokens=120)  # a second settle: no-op
    assert quota_status(tenant_id=TENANT, limits=limits).remaining_tokens == 880


def test_release_refunds_the_whole_reservation(backend):
    limits = replace(LIMITS, tokens_per_day=1000)
    admission = quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=500)

    assert quota_release(admission=admission)

    status = quota_status(tenant_id=TENANT, limits=limits)
    assert status.remaining_tokens == 1000
    assert status.headers["x-ratelimit-reset-tokens"] == "0s"
    assert not quota_release(admission=admission)


def test_tokens_refusal_changes_nothing(backend):
    limits = replace(LIMITS, tokens_per_day=1000)
    quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=600)
    before = quota_status(tenant_id=TENANT, limits=limits)

    refusal = _refusal(limits, reserve_tokens=600)

    assert refusal.code == "tokens_quota_exceeded"
    assert refusal.type == "insufficient_quota"
    assert refusal.headers["x-should-retry"] == "false"
    assert refusal.headers["x-ratelimit-remaining-tokens"] == "400"
    assert int(refusal.headers["retry-after"]) <= 86_400
    after = quota_status(tenant_id=TENANT, limits=limits)
    assert (after.remaining_requests, after.remaining_tokens, after.in_flight) == (
        before.remaining_requests,
        before.remaining_tokens,
        before.in_flight,
    )
    assert _admit_or_code(limits, reserve_tokens=400) == "admitted"  # what is left still fits


def test_concurrency_is_limited_by_leases(backend):
    limits = replace(LIMITS, concurrent_requests=2)
    first = quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=10)
    quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=10)
    before = quota_status(tenant_id=TENANT, limits=limits)

    refusal = _refusal(limits, reserve_tokens=10)

    assert refusal.code == "concurrency_limit_exceeded"
    assert refusal.type == "rate_limit_error"
    assert refusal.headers["retry-after"] == "1"
    after = quota_status(tenant_id=TENANT, limits=limits)
    assert after.in_flight == 2
    assert after.remaining_requests == before.remaining_requests  # the refusal was not counted
    assert after.remaining_tokens == before.remaining_tokens  # nor reserved
    quota_settle(admission=first, used_tokens=3)
    assert _admit_or_code(limits, reserve_tokens=10) == "admitted"


def test_a_crashed_request_frees_its_slot_when_the_lease_expires(backend):
    store = quota_store_get()

    def admit(now_ms: int, lease_id: str):
        return store.admit(
            tenant_id=TENANT,
            requests_per_minute=100,
            tokens_per_day=1000,
            concurrent_requests=1,
            reserve_tokens=100,
            lease_id=lease_id,
            lease_ms=1000,
            now_ms=now_ms,
        )

    assert admit(T0, "crashed").admitted  # never settled
    assert admit(T0 + 999, "second").refused_by == "concurrency"
    outcome = admit(T0 + 1000, "third")
    assert outcome.admitted
    assert outcome.state.in_flight == 1
    assert outcome.state.tokens_used == 200  # the crashed reservation stays charged
    assert not store.finish(tenant_id=TENANT, lease_id="crashed", used_tokens=0)


def test_the_token_day_rolls_over_at_utc_midnight(backend):
    store = quota_store_get()
    midnight = (T0 // DAY_MS + 1) * DAY_MS

    def admit(now_ms: int, lease_id: str, reserve: int):
        return store.admit(
            tenant_id=TENANT,
            requests_per_minute=100,
            tokens_per_day=1000,
            concurrent_requests=10,
            reserve_tokens=reserve,
            lease_id=lease_id,
            lease_ms=DAY_MS,
            now_ms=now_ms,
        )

    assert admit(midnight - 1000, "late", 900).admitted
    assert admit(midnight - 500, "later", 900).refused_by == "tokens"
    tomorrow = admit(midnight, "tomorrow", 900)
    assert tomorrow.admitted
    assert tomorrow.state.tokens_used == 900
    # Settling yesterday's request does not touch today's counter.
    assert store.finish(tenant_id=TENANT, lease_id="late", used_tokens=10)
    assert store.status(tenant_id=TENANT, now_ms=midnight + 1).tokens_used == 900


def test_tenants_do_not_share_counters(backend):
    limits = replace(LIMITS, requests_per_minute=1)
    quota_admit(tenant_id=TENANT, limits=limits, reserve_tokens=0)

    assert _admit_or_code(limits) == "rate_limit_exceeded"
    quota_admit(tenant_id=TENANT + 1, limits=limits, reserve_tokens=0)  # another tenant: fine


def test_redis_keys_are_tenant_scoped(settings, quota_namespace):
    settings.QUOTA_BACKEND = "redis"
    quota_admit(tenant_id=TENANT, limits=LIMITS, reserve_tokens=1)

    keys = sorted(
        k.decode() for k in redis_client_for(settings.REDIS_URL).keys(f"{quota_namespace}:*")
    )

    assert keys == [
        f"{quota_namespace}:{{{TENANT}}}:{name}" for name in ("conc", "leases", "rpm", "tpd")
    ]


def _burst(limits: EffectiveLimits, threads: int, start=None) -> Counter:  # type: ignore[no-untyped-def]
    """``threads`` simultaneous admissions; a Counter of outcomes."""
    barrier = threading.Barrier(threads)

    def one(_: int) -> str:
        barrier.wait()
        return _admit_or_code(limits)

    if start is not None:
        start.wait()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return Counter(pool.map(one, range(threads)))


def _burst_in_child(limits: EffectiveLimits, threads: int, start, results) -> None:  # type: ignore[no-untyped-def]
    results.put(_burst(limits, threads, start))


@pytest.mark.parametrize(
    ("limits", "refused_code"),
    [
        (replace(LIMITS, requests_per_minute=10), "rate_limit_exceeded"),
        (replace(LIMITS, concurrent_requests=10), "concurrency_limit_exceeded"),
    ],
    ids=["requests", "concurrency"],
)
def test_100_parallel_requests_from_two_processes_admit_exactly_10(settings, limits, refused_code):
    settings.QUOTA_BACKEND = "redis"
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    children = [
        context.Process(target=_burst_in_child, args=(limits, 50, start, results)) for _ in range(2)
    ]
    for child in children:
        child.start()
    start.set()
    outcomes = results.get(timeout=30) + results.get(timeout=30)
    for child in children:
        child.join(timeout=10)

    assert [child.exitcode for child in children] == [0, 0]
    assert outcomes == Counter({"admitted": 10, refused_code: 90})
    status = quota_status(tenant_id=TENANT, limits=limits)
    assert status.limit_requests - status.remaining_requests == 10


@pytest.mark.parametrize(
    ("limits", "refused_code"),
    [
        (replace(LIMITS, requests_per_minute=10), "rate_limit_exceeded"),
        (replace(LIMITS, concurrent_requests=10), "concurrency_limit_exceeded"),
    ],
    ids=["requests", "concurrency"],
)
def test_100_parallel_requests_on_the_embedded_store_admit_exactly_10(
    settings, limits, refused_code
):
    settings.QUOTA_BACKEND = "local"

    outcomes = _burst(limits, 100)

    assert outcomes == Counter({"admitted": 10, refused_code: 90})


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (20, "20ms"),
        (1000, "1s"),
        (8640, "8.64s"),
        (360_000, "6m0s"),
        (3_723_500, "1h2m3.5s"),
        (86_400_000, "24h0m0s"),
    ],
)
def test_reset_durations_are_written_as_openai_does(ms, text):
    assert duration_format(ms) == text


def test_reset_headers_after_an_admission(backend):
    admission = quota_admit(tenant_id=TENANT, limits=LIMITS, reserve_tokens=10)

    headers = admission.headers

    assert list(headers) == list(RATE_LIMIT_HEADER_NAMES)
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "99"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"  # this admission leaves in 60 s
    assert headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 10)
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
