"""The pieces under the fault tests, without workers or a web server: web-side Redis clients
recover from a restart by themselves, every retried command is safe to repeat, and a waiting
request notices a model left without a live worker (and only then)."""

from __future__ import annotations

import asyncio
import time

import pytest

from inference.client.redis_streams import RedisStreamsClient
from inference.protocol import REQUEST_FIELD, ErrorCode, ErrorEvent, KeySpace, encode
from inference.settings import InferenceSettings
from inference.worker.redis_streams import RedisWorkerTransport
from tenants.quota_stores import RedisQuotaStore
from tenants.redis_options import redis_options
from tests.inference.fakes import make_heartbeat, make_request, unique_prefix
from tests.reliability.conftest import RedisServer

MODEL = "fake"


def inference_settings(redis: RedisServer, **overrides: object) -> InferenceSettings:
    values: dict = {
        "transport": "redis",
        "redis_url": redis.url,
        "key_prefix": unique_prefix(),
        "models": {MODEL: {}},
        "request_timeout_s": 30.0,
    }
    values.update(overrides)
    return InferenceSettings(**values)


def test_clients_opened_before_a_restart_serve_every_call_after_it(fault_redis) -> None:
    """The probe's failure: pooled connections of before a restart made calls fail (then 27
    of 40); with health checks and retries on connection errors, none fails."""
    client = RedisStreamsClient(settings=inference_settings(fault_redis))
    import redis as redis_py

    quota = RedisQuotaStore(
        client=redis_py.Redis.from_url(
            fault_redis.url,
            **redis_options(
                socket_timeout_s=0.5, connect_timeout_s=0.5, health_check_s=1.0, retries=3
            ),
        ),
        key_prefix=unique_prefix(),
    )

    async def burst() -> None:  # 20 at once: 20 pooled connections
        await asyncio.gather(*[client.cancel(f"r{i}") for i in range(20)])

    async def scenario() -> list[str]:
        await burst()
        [quota.status(tenant_id=1) for _ in range(5)]
        fault_redis.restart()
        failures = []
        for i in range(40):
            try:
                await client.cancel(f"r{i}")  # a write, never answered from a cache
                quota.status(tenant_id=1)
            except Exception as exc:  # every failure is the finding
                failures.append(repr(exc))
        await client.aclose()
        return failures

    assert asyncio.run(scenario()) == []


def test_quota_admit_is_idempotent_per_lease(fault_redis) -> None:
    """A retried admit (its reply lost) reserves once and counts one request."""
    import redis as redis_py

    store = RedisQuotaStore(client=redis_py.Redis.from_url(fault_redis.url), key_prefix="q")
    args = {
        "tenant_id": 7,
        "requests_per_minute": 10,
        "tokens_per_day": 1000,
        "concurrent_requests": 1,
        "reserve_tokens": 300,
        "lease_ms": 60_000,
    }
    first = store.admit(lease_id="lease-a", **args)
    again = store.admit(lease_id="lease-a", **args)
    assert first.admitted and again.admitted
    assert (again.state.requests_used, again.state.tokens_used, again.state.in_flight) == (
        1,
        300,
        1,
    )
    # A different lease is a different request: refused by the concurrency limit of 1.
    assert store.admit(lease_id="lease-b", **args).refused_by == "concurrency"


def test_the_enqueue_adds_a_request_once_per_id(fault_redis) -> None:
    """The submit script run twice for one request id (a retry) leaves one entry."""
    settings = inference_settings(fault_redis)
    client = RedisStreamsClient(settings=settings)
    request = make_request(model=MODEL)
    keys = KeySpace(settings.key_prefix)

    async def scenario() -> int:
        script = client._loop_clients().submit_script
        for _ in range(2):
            await script(
                keys=[keys.requests(MODEL), client._submitted_key(request.request_id)],
                args=[encode(request), 30_000, REQUEST_FIELD],
            )
        length = int(await client._redis().xlen(keys.requests(MODEL)))
        await client.aclose()
        return length

    assert asyncio.run(scenario()) == 1


async def _first_event_within(client: RedisStreamsClient, seconds: float) -> object:
    events = client.submit(make_request(model=MODEL))
    try:
        return await asyncio.wait_for(anext(events), seconds)
    except TimeoutError:
        return None
    finally:
        await events.aclose()


def test_a_waiting_request_ends_with_worker_lost_when_no_worker_is_live(fault_redis) -> None:
    settings = inference_settings(fault_redis, heartbeat_s=0.25)  # TTL 1 s
    worker = RedisWorkerTransport.from_url(
        fault_redis.url, settings=settings, model=MODEL, worker_id="w1"
    )
    worker.setup()
    worker.heartbeat(make_heartbeat("w1", model=MODEL))  # then dies: no more beats
    client = RedisStreamsClient(settings=settings)

    started = time.monotonic()
    event = asyncio.run(_first_event_within(client, 10))
    elapsed = time.monotonic() - started

    assert isinstance(event, ErrorEvent) and event.code is ErrorCode.WORKER_LOST, event
    assert event.retryable
    # The heartbeat expires after 1 s, then one more TTL without a live worker, in waits of
    # 0.5 s: about 2 to 2.5 s, never the 30 s request timeout.
    assert 1.5 < elapsed < 4.0, elapsed
    worker.close()


def test_a_late_heartbeat_is_not_taken_for_a_dead_worker(fault_redis) -> None:
    """A worker whose key lapses for half a second (a long engine step) keeps its requests
    waiting; only a model without a live worker for a whole TTL gives them up."""
    settings = inference_settings(fault_redis, heartbeat_s=0.25)
    worker = RedisWorkerTransport.from_url(
        fault_redis.url, settings=settings, model=MODEL, worker_id="w1"
    )
    worker.setup()
    client = RedisStreamsClient(settings=settings)

    async def scenario() -> object:
        async def beats() -> None:  # beats with a 1.5 s gap: the 1 s key lapses for 0.5 s
            for pause in (0.2, 0.2, 1.5, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2):
                worker.heartbeat(make_heartbeat("w1", model=MODEL))
                await asyncio.sleep(pause)

        beating = asyncio.create_task(beats())
        event = await _first_event_within(client, 3.5)
        await beating
        return event

    assert asyncio.run(scenario()) is None  # still waiting, no worker_lost
    worker.close()


@pytest.fixture(autouse=True)
def _running(fault_redis):
    fault_redis.ensure_running()
