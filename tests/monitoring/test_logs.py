"""Structured logs of real requests: the web side (uvicorn serving the platform in this
process, its records rendered by the LOG_FORMAT=json formatter of webplatform/settings.py)
sends completions, one with an image, to a worker PROCESS writing JSON lines. Every line is
JSON; the worker's request log carries the web's request id and tenant id; and no line,
web or worker, holds a secret, a whole API key or a piece of the image."""

from __future__ import annotations

import base64
import io
import json
import logging
import time

import httpx
import pytest
from django.conf import settings as django_settings
from django.utils.module_loading import import_string

from tests.monitoring.conftest import MODEL
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]


def _json_handler() -> tuple[logging.Handler, io.StringIO]:
    """A handler with the web side's JSON formatter, as settings.LOGGING declares it."""
    factory = import_string(django_settings.LOGGING["formatters"]["json"]["()"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(factory())
    return handler, stream


@pytest.mark.redis
@pytest.mark.slow
def test_json_logs_of_real_requests_carry_ids_and_no_secret(web, worker, owner):
    server, key = web
    handler, web_log = _json_handler()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    png = corpus.noise_png(9000)  # noise: every 24-character piece of it is unique
    image_b64 = base64.b64encode(png).decode()
    request_ids = []
    try:
        logging.getLogger("webplatform.test").info("a line with %s in it", key)
        for stream in (True, False):
            body = {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in this image?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/png;base64,{image_b64}"},
                            },
                        ],
                    }
                ],
                "max_tokens": 6,
                "temperature": 0.7,
                "stream": stream,
            }
            response = httpx.post(
                server.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            request_ids.append(response.headers["x-request-id"])
        # A refused image: settled as an error, and Django's warning about the 400 carries
        # the request's context (request id, tenant, key) without any code passing it.
        not_an_image = base64.b64encode(b"plain text, no image").decode()
        bad_image = httpx.post(
            server.url + "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/png;base64,{not_an_image}"},
                            }
                        ],
                    }
                ],
                "max_tokens": 6,
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert bad_image.status_code == 400, bad_image.text
        bad_image_id = bad_image.headers["x-request-id"]
        # A refused key and a bad request: the web side logs these (django.request).
        wrong_secret = key[:-8] + "XXXXXXXX"  # the key with its last 8 characters changed
        refused = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": []},
            headers={"Authorization": f"Bearer {wrong_secret}"},
            timeout=30,
        )
        assert refused.status_code == 401
        time.sleep(0.5)  # the worker's last line is flushed
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)

    web_lines = [json.loads(line) for line in web_log.getvalue().splitlines()]
    worker_lines = [json.loads(line) for line in worker.log_path.read_text().splitlines()]
    assert web_lines and worker_lines  # every line parsed as JSON
    assert any(line["event"].startswith("a line with sk_") for line in web_lines)

    finished = {
        line["request_id"]: line for line in worker_lines if line["event"] == "request finished"
    }
    for request_id in request_ids:  # the web's id, carried to the worker
        line = finished[request_id]
        assert line["tenant_id"] == str(owner.tenant.pk)
        assert line["model"] == MODEL and line["outcome"] in ("stop", "length")
        assert line["e2e_s"] >= line["ttft_s"] >= line["queue_s"] >= 0
        assert line["worker_id"] and line["level"] == "info"

    # The web's request log: one "completion settled" line per completion, ids and timings.
    public_id = key.split("_")[1]
    settled = {
        line["request_id"]: line for line in web_lines if line["event"] == "completion settled"
    }
    for request_id in request_ids:
        line = settled[request_id]
        assert (line["tenant_id"], line["key_id"]) == (str(owner.tenant.pk), public_id)
        assert (line["model"], line["channel"], line["status"]) == (MODEL, "rest", "ok")
        assert line["error_code"] is None and line["cache_hit"] is False
        assert line["image_count"] == 1 and line["prompt_tokens"] > line["image_tokens"] > 0
        assert 0 < line["completion_tokens"] <= 6 and line["level"] == "info"
        assert line["latency_s"] >= (line["ttft_s"] or 0) >= 0
    refused_line = settled[bad_image_id]
    assert (refused_line["status"], refused_line["error_code"]) == (
        "error",
        "unsupported_image_type",
    )
    assert refused_line["image_count"] == 0 and refused_line["completion_tokens"] == 0
    warning = next(
        line
        for line in web_lines
        if line["logger"] == "django.request" and "Bad Request" in line["event"]
    )
    assert warning["request_id"] == bad_image_id  # bound by RequestIdMiddleware
    assert (warning["tenant_id"], warning["key_id"]) == (str(owner.tenant.pk), public_id)
    unauthorized = next(line for line in web_lines if "Unauthorized" in line["event"])
    assert unauthorized["request_id"] and "tenant_id" not in unauthorized  # no key, no tenant

    everything = web_log.getvalue() + worker.log_path.read_text()
    assert not_an_image not in everything and "What is in this image?" not in everything
    secret_part = key.rsplit("_", 1)[1]
    for secret in (
        key,
        secret_part,
        wrong_secret.rsplit("_", 1)[1],
        django_settings.SECRET_KEY,
        django_settings.API_KEY_HMAC_SECRET,
    ):
        assert secret not in everything
    for start in range(0, len(image_b64) - 24, 24):  # no piece of the image, encoded
        assert image_b64[start : start + 24] not in everything
    assert png[:64].hex() not in everything
