"""Prometheus metrics of the request path, served at ``/metrics`` for the scraper.

Counters and histograms are per process (one uvicorn process per container); the
``platform_model_*`` gauges are read when scraped (``model_health`` and, on the Redis
transport, the request stream itself), so they are the shared truth from Redis rather than
one process's view: every web replica reports the same value, and dashboards take ``max``
over replicas, not ``sum``. Set ``METRICS_TOKEN`` to require ``Authorization: Bearer
<token>`` on the endpoint.

Labels are bounded: ``model`` (the served models of ``INFERENCE_MODELS``), ``channel``,
``status``, ``code`` (OpenAI-style error codes, a fixed vocabulary), ``kind``. Never a
tenant, key or request id: per-tenant figures are the usage records' job (the dashboard's
usage pages), and one series per tenant would grow Prometheus without bound.

The inference workers serve their own ``inference:*`` metrics on a port of their own
(``inference/worker/metrics.py``).
"""

from __future__ import annotations

import hmac
import logging

import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from inference.client import get_inference_client
from inference.protocol import GROUP, KeySpace
from webplatform.uploads.errors import UploadErrorCode

logger = logging.getLogger(__name__)

REQUESTS = Counter(
    "platform_completion_requests_total",
    "Chat completion requests settled, by model, channel and status.",
    ["model", "channel", "status", "cache_hit"],
)
TOKENS = Counter(
    "platform_completion_tokens_total",
    "Tokens served, by model and kind (prompt, completion).",
    ["model", "kind"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "platform_time_to_first_token_seconds",
    "Time from admission to the first streamed text.",
    ["model"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10),
)
LATENCY = Histogram(
    "platform_completion_latency_seconds",
    "Time from admission to the end of the answer.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
LIVE_WORKERS = Gauge("platform_model_live_workers", "Live inference workers.", ["model"])
QUEUE_DEPTH = Gauge(
    "platform_model_queue_depth",
    "Requests not running anywhere: in the queue, or taken by a worker and waiting in its "
    "engine for a batch slot.",
    ["model"],
)
QUEUE_WAITING = Gauge(
    "platform_model_queue_waiting",
    "Requests in the queue not yet taken by any worker (the consumer group's lag).",
    ["model"],
)
QUEUE_PENDING = Gauge(
    "platform_model_queue_pending",
    "Requests taken by a worker and not finished (the consumer group's pending entries, "
    "including a dead worker's awaiting reclaim).",
    ["model"],
)
QUEUE_LAG = Gauge(
    "platform_model_queue_lag_seconds",
    "Age of the oldest request no worker has taken yet (0 when none waits): how long a new "
    "request waits before any worker sees it. Redis transport only.",
    ["model"],
)
OLDEST_PENDING = Gauge(
    "platform_model_oldest_pending_seconds",
    "Age of the oldest request taken by a worker and not finished (0 when none). Redis "
    "transport only.",
    ["model"],
)
RUNNING = Gauge("platform_model_running", "Requests in a decode batch, all workers.", ["model"])
CAPACITY = Gauge("platform_model_capacity", "Batch slots of the live workers.", ["model"])
TOKENS_PER_SECOND = Gauge(
    "platform_model_tokens_per_second",
    "Generation rate reported by the live workers' heartbeats, summed.",
    ["model"],
)
SCRAPE_ERRORS = Counter(
    "platform_model_health_errors",
    "Scrapes that could not read a model's health (Redis unreachable): its gauges kept "
    "their previous values.",
    ["model"],
)

# --- counters of the completion path's steps (webplatform/completions/) ---------------------
# Each is fed at the one step where its event happens: admission refusals in the pipeline's
# step 1, image refusals in ``validation``, lookups in ``cache``, fallbacks in ``routing``,
# errors in settlement (through ``completion_observe``). Codes are fixed vocabularies
# (``ApplicationError`` codes written in the code, ``UploadErrorCode``, ``ErrorCode``);
# models are served ones, since a request only reaches routing and settlement once
# admission found its model in the caller's allowed models (a subset of the served ones),
# or ``auto`` before routing chose one.
ADMISSIONS_REFUSED = Counter(
    "platform_admissions_refused",
    "Requests refused at admission (plan, key scope, limits, quota), by error code.",
    ["code"],
)
UPLOADS_REFUSED = Counter(
    "platform_uploads_refused",
    "Images refused by validation or the virus scan, by error code.",
    ["code"],
)
ANSWER_CACHE = Counter(
    "platform_answer_cache_lookups", "Answer-cache lookups, by result (hit, miss).", ["result"]
)
FALLBACKS = Counter(
    "platform_model_fallbacks",
    "Requests routed to a plan's fallback model, by the model asked for and the one used.",
    ["model", "fallback"],
)
COMPLETION_ERRORS = Counter(
    "platform_completion_errors",
    "Completions that ended in an error, by model and error code.",
    ["model", "code"],
)


# Series of the fixed label sets start at 0, so that rate() sees their first increment.
for _code in UploadErrorCode:
    UPLOADS_REFUSED.labels(_code.value)
for _result in ("hit", "miss"):
    ANSWER_CACHE.labels(_result)


def admission_refused(*, code: str) -> None:
    ADMISSIONS_REFUSED.labels(code).inc()


def upload_refused(*, code: str) -> None:
    UPLOADS_REFUSED.labels(code).inc()


def answer_cache_lookup(*, hit: bool) -> None:
    ANSWER_CACHE.labels("hit" if hit else "miss").inc()


def model_fallback(*, model: str, fallback: str) -> None:
    FALLBACKS.labels(model, fallback).inc()


def completion_error(*, model: str, code: str) -> None:
    COMPLETION_ERRORS.labels(model, code).inc()


def completion_observe(
    *,
    model: str,
    channel: str,
    status: str,
    cache_hit: bool,
    prompt_tokens: int,
    completion_tokens: int,
    ttft_s: float | None,
    latency_s: float,
    error_code: str = "",
) -> None:
    REQUESTS.labels(model, channel, status, str(cache_hit).lower()).inc()
    if status == "error":
        completion_error(model=model, code=error_code or "internal_error")
    TOKENS.labels(model, "prompt").inc(prompt_tokens)
    TOKENS.labels(model, "completion").inc(completion_tokens)
    if ttft_s is not None:
        TIME_TO_FIRST_TOKEN.labels(model).observe(ttft_s)
    LATENCY.labels(model).observe(latency_s)


async def metrics_view(request: HttpRequest) -> HttpResponse:
    token = settings.METRICS_TOKEN
    if token:
        supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), token.encode()):
            return HttpResponse(status=401)
    await _models_observe()
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)


async def _models_observe() -> None:
    """Refresh the ``platform_model_*`` gauges of every served model."""
    client = get_inference_client()
    queue = _QueueAges.for_settings()
    try:
        for model in settings.INFERENCE_MODELS:
            try:
                health = await client.model_health(model)
                ages = await queue.ages(model) if queue is not None else None
            except Exception:  # a scrape must not fail because Redis blinked
                logger.warning("model health of %s unreadable for /metrics", model, exc_info=True)
                SCRAPE_ERRORS.labels(model).inc()
                continue
            LIVE_WORKERS.labels(model).set(health.live_workers)
            QUEUE_DEPTH.labels(model).set(health.queue_depth)
            QUEUE_WAITING.labels(model).set(health.waiting)
            QUEUE_PENDING.labels(model).set(health.pending)
            RUNNING.labels(model).set(health.running)
            CAPACITY.labels(model).set(health.capacity)
            TOKENS_PER_SECOND.labels(model).set(health.tokens_per_second)
            if ages is not None:
                QUEUE_LAG.labels(model).set(ages[0])
                OLDEST_PENDING.labels(model).set(ages[1])
    finally:
        if queue is not None:
            await queue.aclose()


class _QueueAges:
    """How old the oldest waiting and the oldest pending request of a model's stream are.

    Stream entry ids are Redis's clock in milliseconds at ``XADD``, and the age is taken
    against Redis's own ``TIME``, so no host clock is involved. Finished entries are
    deleted by the workers (docs/architecture.md), so the first entry after the group's
    last-delivered id is the oldest one no worker has taken, and ``XPENDING``'s smallest id
    the oldest one taken and not finished.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self.keys = KeySpace(prefix)
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    @classmethod
    def for_settings(cls) -> _QueueAges | None:
        if settings.INFERENCE_TRANSPORT != "redis" or not settings.INFERENCE_REDIS_URL:
            return None  # embedded mode: no stream to read
        return cls(settings.INFERENCE_REDIS_URL, settings.INFERENCE_KEY_PREFIX)

    async def ages(self, model: str) -> tuple[float, float]:
        stream = self.keys.requests(model)
        seconds, micros = await self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        after = "-"
        oldest_pending_ms: int | None = None
        try:
            groups = await self.redis.xinfo_groups(stream)
        except redis.ResponseError:  # no stream yet: nothing was ever queued
            return 0.0, 0.0
        for group in groups:
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) == GROUP:
                last = group["last-delivered-id"]
                after = "(" + (last.decode() if isinstance(last, bytes) else last)
                summary = await self.redis.xpending(stream, GROUP)
                oldest = summary["min"]
                if summary["pending"] and oldest is not None:
                    oldest_pending_ms = _entry_ms(oldest)
        first = await self.redis.xrange(stream, min=after, max="+", count=1)
        first_id = first[0][0] if first else None
        lag = (now_ms - _entry_ms(first_id)) / 1000 if first_id is not None else 0.0
        pending = (now_ms - oldest_pending_ms) / 1000 if oldest_pending_ms is not None else 0.0
        return max(0.0, lag), max(0.0, pending)

    async def aclose(self) -> None:
        await self.redis.aclose()


def _entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])
