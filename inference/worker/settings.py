"""The worker's own settings, read from the environment without Django.

The same variable names, defaults and parsing (django-environ's ``FileAwareEnv``: any
variable may also be given as ``NAME_FILE``) as ``webplatform/settings.py`` uses for the web
side, so one environment configures both processes alike; a test holds the two readers to
each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import environ

from inference.settings import InferenceSettings

# The checkout (or install) root: webplatform/settings.py's BASE_DIR.
_BASE_DIR = Path(__file__).resolve().parent.parent.parent


def default_models(var_dir: Path) -> dict[str, dict[str, str]]:
    """``INFERENCE_MODELS`` when unset: the tiny test model (``make tiny-model``) and ocr-lite."""
    return {
        "glm-4.6v-flash": {
            "path": str(var_dir / "tiny-glm4v"),
            "dtype": "float32",
            "device": "auto",
        },
        "ocr-lite": {"kind": "ocr-lite"},
    }


def _env(environ_: Mapping[str, str] | None) -> environ.Env:
    # FileAwareEnv, as the web side: any variable may come as NAME_FILE (a mounted secret).
    env = environ.FileAwareEnv()
    env.ENVIRON = environ.FileAwareMapping(env=os.environ if environ_ is None else environ_)
    return env


def worker_settings(environ_: Mapping[str, str] | None = None) -> InferenceSettings:
    """The inference settings from ``environ_`` (default: the process environment)."""
    env = _env(environ_)
    var_dir = Path(env.str("PLATFORM_VAR_DIR", default=str(_BASE_DIR / "var")))
    models = env.str("INFERENCE_MODELS", default="") or json.dumps(default_models(var_dir))
    return InferenceSettings(
        transport="redis",
        redis_url=env.str("INFERENCE_REDIS_URL", default=env.str("REDIS_URL", default="")),
        key_prefix=env.str("INFERENCE_KEY_PREFIX", default="inference"),
        models=json.loads(models),
        blob_ttl_s=env.int("INFERENCE_BLOB_TTL_SECONDS", default=900),
        reply_ttl_s=env.int("INFERENCE_REPLY_TTL_SECONDS", default=300),
        claim_idle_ms=env.int("INFERENCE_CLAIM_IDLE_MS", default=2000),
        heartbeat_s=env.float("INFERENCE_HEARTBEAT_SECONDS", default=0.25),
        health_cache_s=env.float("INFERENCE_HEALTH_CACHE_SECONDS", default=0.25),
        request_timeout_s=env.float("INFERENCE_REQUEST_TIMEOUT_SECONDS", default=600.0),
        max_deliveries=env.int("INFERENCE_MAX_DELIVERIES", default=3),
        redis_socket_timeout_s=env.float("REDIS_SOCKET_TIMEOUT_SECONDS", default=0.5),
        redis_connect_timeout_s=env.float("REDIS_CONNECT_TIMEOUT_SECONDS", default=0.5),
        redis_health_check_s=env.float("REDIS_HEALTH_CHECK_SECONDS", default=1.0),
        redis_retries=env.int("REDIS_RETRIES", default=3),
    )


def log_level(environ_: Mapping[str, str] | None = None) -> str:
    """``LOG_LEVEL``, as the web side's LOGGING reads it."""
    return str(_env(environ_).str("LOG_LEVEL", default="INFO"))
