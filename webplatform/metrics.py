"""Prometheus metrics of the request path, served at ``/metrics`` for the scraper.

Counters and histograms are per process (one uvicorn process per container); queue depth
and live workers are read from the inference client when scraped, so they are the shared
truth from Redis rather than one process's view. Set ``METRICS_TOKEN`` to require
``Authorization: Bearer <token>`` on the endpoint.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from inference.client import get_inference_client

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
QUEUE_DEPTH = Gauge("platform_model_queue_depth", "Requests waiting for a worker.", ["model"])


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
) -> None:
    REQUESTS.labels(model, channel, status, str(cache_hit).lower()).inc()
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
    client = get_inference_client()
    for model in settings.INFERENCE_MODELS:
        try:
            health = await client.model_health(model)
        except Exception:  # a scrape must not fail because Redis blinked
            continue
        LIVE_WORKERS.labels(model).set(health.live_workers)
        QUEUE_DEPTH.labels(model).set(health.queue_depth)
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
