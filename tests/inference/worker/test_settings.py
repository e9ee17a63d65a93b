"""The worker's own settings (inference/worker/settings.py) against the web side's reader.

One environment must configure both processes alike: the worker reads the variables
webplatform/settings.py reads, with its defaults, without Django. Each case runs both
readers in a fresh interpreter on the same environment and compares what they built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inference.worker.settings import worker_settings
from tests.fresh_interpreter import python_json

_BOTH_READERS = """
import dataclasses, json
from inference.client.factory import inference_settings
from inference.worker.settings import worker_settings
web = dataclasses.asdict(inference_settings())
web.pop("transport")  # the web side's choice; a worker always serves Redis
worker = dataclasses.asdict(worker_settings())
worker.pop("transport")
print(json.dumps({"web": web, "worker": worker}))
"""

_INFERENCE_VARIABLES = {
    "INFERENCE_MODELS": json.dumps({"m": {"path": "/models/m", "max_batch_size": 16}}),
    "INFERENCE_REDIS_URL": "redis://queue:6379/2",
    "REDIS_URL": "redis://cache:6379/0",
    "INFERENCE_KEY_PREFIX": "inf-b",
    "INFERENCE_BLOB_TTL_SECONDS": "60",
    "INFERENCE_REPLY_TTL_SECONDS": "30",
    "INFERENCE_CLAIM_IDLE_MS": "2500",
    "INFERENCE_HEARTBEAT_SECONDS": "0.5",
    "INFERENCE_HEALTH_CACHE_SECONDS": "0.1",
    "INFERENCE_REQUEST_TIMEOUT_SECONDS": "90",
    "INFERENCE_MAX_DELIVERIES": "5",
}


def _both_readers(tmp_path: Path, variables: dict[str, str]) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("INFERENCE_") and key != "REDIS_URL"
    }
    env.update(
        DJANGO_SETTINGS_MODULE="webplatform.settings",
        DJANGO_SECRET_KEY="test",
        API_KEY_HMAC_SECRET="test",
        PLATFORM_VAR_DIR=str(tmp_path),
        **variables,
    )
    report: dict = python_json(_BOTH_READERS, env=env)
    return report


@pytest.mark.parametrize(
    "variables",
    [
        pytest.param({}, id="defaults"),
        pytest.param(_INFERENCE_VARIABLES, id="all-set"),
        pytest.param({"REDIS_URL": "redis://cache:6379/0"}, id="queue-on-the-cache-redis"),
    ],
)
def test_the_worker_reads_what_the_web_side_reads(tmp_path, variables):
    both = _both_readers(tmp_path, variables)
    assert both["worker"] == both["web"]
    if not variables:  # the tiny test model in PLATFORM_VAR_DIR, and ocr-lite
        path = both["worker"]["models"]["glm-4.6v-flash"]["path"]
        assert path == str(tmp_path / "tiny-glm4v")
        assert both["worker"]["models"]["ocr-lite"] == {"kind": "ocr-lite"}


def test_a_variable_may_come_from_a_file(tmp_path):
    """``NAME_FILE`` (a mounted secret: a Redis URL with its password) on both sides."""
    secret = tmp_path / "redis-url"
    secret.write_text("redis://:password@queue:6379/0")
    both = _both_readers(tmp_path, {"INFERENCE_REDIS_URL_FILE": str(secret)})
    assert both["worker"] == both["web"]
    assert both["worker"]["redis_url"] == "redis://:password@queue:6379/0"


def test_values_are_parsed_not_passed_as_text():
    settings = worker_settings(_INFERENCE_VARIABLES)
    assert settings.redis_url == "redis://queue:6379/2"  # its own URL wins over REDIS_URL
    assert settings.models == {"m": {"path": "/models/m", "max_batch_size": 16}}
    assert (settings.claim_idle_ms, settings.heartbeat_s, settings.max_deliveries) == (2500, 0.5, 5)
    assert settings.heartbeat_ttl_s == 1.5
