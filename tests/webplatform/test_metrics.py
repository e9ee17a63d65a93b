"""The web side's /metrics (webplatform/metrics.py): model health and queue ages read from
the real Redis when scraped; the token check; no tenant in any label."""

from __future__ import annotations

import pytest
import redis
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from inference.client import reset_inference_client
from inference.protocol import GROUP, REQUEST_FIELD, KeySpace, encode
from inference.settings import InferenceSettings
from inference.worker.redis_streams import RedisWorkerTransport
from tests.inference.fakes import (
    delete_prefix,
    make_heartbeat,
    make_request,
    redis_url_for_tests,
    unique_prefix,
)

MODEL = "metrics-model"


def scrape(client: Client, **headers: str) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.status_code
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.content.decode())
        for s in family.samples
    }


@pytest.fixture
def redis_models(settings):
    """The Redis transport in a fresh key namespace serving MODEL (no worker unless a test
    registers one)."""
    url = redis_url_for_tests()
    if url is None:
        pytest.skip("needs REDIS_URL pointing at a reachable Redis")
    prefix = unique_prefix()
    settings.INFERENCE_TRANSPORT = "redis"
    settings.INFERENCE_REDIS_URL = url
    settings.INFERENCE_KEY_PREFIX = prefix
    settings.INFERENCE_MODELS = {MODEL: {}}
    reset_inference_client()
    yield InferenceSettings(
        transport="redis", redis_url=url, key_prefix=prefix, models={MODEL: {}}, heartbeat_s=5
    )
    reset_inference_client()
    delete_prefix(url, prefix)


@pytest.mark.redis
def test_queue_lag_is_the_age_of_the_oldest_request_no_worker_took(redis_models, db):
    keys = KeySpace(redis_models.key_prefix)
    stream = keys.requests(MODEL)
    r = redis.Redis.from_url(redis_models.redis_url)
    transport = RedisWorkerTransport.from_url(
        redis_models.redis_url, settings=redis_models, model=MODEL, worker_id="w1"
    )
    try:
        seconds, _ = r.time()
        now_ms = seconds * 1000
        # Three requests queued 30, 20 and 10 seconds ago (entry ids are Redis's clock).
        for age in (30, 20, 10):
            request = make_request("hello", model=MODEL, tenant_id="tenant-7f3a")
            r.xadd(stream, {REQUEST_FIELD: encode(request)}, id=f"{now_ms - age * 1000}-0")
        transport.setup()  # the consumer group; one worker, alive
        transport.heartbeat(make_heartbeat("w1", model=MODEL, running=1))
        r.xreadgroup(GROUP, "w1", {stream: ">"}, count=1)  # it took the oldest

        got = scrape(Client())
    finally:
        transport.close()
        r.close()

    def metric(name: str) -> float:
        return got[(name, (("model", MODEL),))]

    assert metric("platform_model_live_workers") == 1
    assert metric("platform_model_queue_waiting") == 2
    assert metric("platform_model_queue_pending") == 1
    assert metric("platform_model_running") == 1
    assert metric("platform_model_capacity") == 4
    assert 20 <= metric("platform_model_queue_lag_seconds") < 25  # the 20-second-old one
    assert 30 <= metric("platform_model_oldest_pending_seconds") < 35
    labels = {name for (_metric, pairs) in got for name, _ in pairs}
    assert not any("tenant" in name for name in labels)


@pytest.mark.redis
def test_an_empty_queue_has_no_lag_and_no_worker_is_zero_workers(redis_models, db):
    got = scrape(Client())
    assert got[("platform_model_queue_lag_seconds", (("model", MODEL),))] == 0
    assert got[("platform_model_live_workers", (("model", MODEL),))] == 0


def test_the_endpoint_requires_the_metrics_token_when_set(settings, db):
    settings.METRICS_TOKEN = "s3cret-token"
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    scrape(Client(), HTTP_AUTHORIZATION="Bearer s3cret-token")


def test_the_completion_path_counters_have_bounded_labels():
    from webplatform import metrics

    metrics.admission_refused(code="rate_limit_exceeded")
    metrics.answer_cache_lookup(hit=True)
    text = metrics.generate_latest().decode()
    assert 'platform_admissions_refused_total{code="rate_limit_exceeded"}' in text
    assert 'platform_answer_cache_lookups_total{result="hit"}' in text
