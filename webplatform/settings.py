"""Settings for the platform: one module, every deployment difference from the environment.

With ``DATABASE_URL`` and ``REDIS_URL`` unset the platform runs on embedded defaults
(SQLite, process-local cache, quota store and channel layer, in-process inference queue,
eager Celery). With them set it runs on PostgreSQL and Redis. Any variable may also be given
as ``NAME_FILE`` pointing at a file (Docker and Kubernetes secrets; django-environ's
``FileAwareEnv``).

Every setting the code reads is declared here with its default: call sites read
``settings.NAME``, never ``getattr(settings, "NAME", default)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import environ
from celery.schedules import crontab

from tenants.redis_options import redis_options
from webplatform.uploads.clamd import clamd_address_parse

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.FileAwareEnv()


DEBUG = env.bool("DJANGO_DEBUG", default=False)
TESTING = env.bool("PLATFORM_TESTING", default=False)

# The embedded mode generates a per-checkout key on first start so that nothing secret is
# committed; production must set DJANGO_SECRET_KEY (or DJANGO_SECRET_KEY_FILE).
_VAR_DIR = Path(env.str("PLATFORM_VAR_DIR", default=str(BASE_DIR / "var")))


def _embedded_secret(filename: str) -> str:
    import secrets as _secrets

    _VAR_DIR.mkdir(parents=True, exist_ok=True)
    path = _VAR_DIR / filename
    if not path.exists():
        path.write_text(_secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="").strip() or _embedded_secret("secret_key")
# Keyed hash for API keys. Separate from SECRET_KEY so rotating one does not void the other.
API_KEY_HMAC_SECRET = env.str("API_KEY_HMAC_SECRET", default="").strip() or _embedded_secret(
    "api_key_hmac_secret"
)
API_KEY_PREFIX = env.str("API_KEY_PREFIX", default="sk")

ALLOWED_HOSTS = env.list(
    "DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"]
)
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "csp",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "tenants",
    "inference",
    "webplatform",
]

# Django's middleware, most through a subclass in webplatform.middleware that runs it on the
# event loop (it only reads the request and sets headers) or skips it under /v1/ (the
# browser's: sessions, log-in, messages); Django's own hands every hook of every request to
# a thread and back under ASGI. Security, CSRF and clickjacking stay Django's: the
# deployment checks look for these names.
MIDDLEWARE = [
    "webplatform.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "webplatform.middleware.CSPMiddleware",
    "webplatform.middleware.StaticFilesMiddleware",  # WhiteNoise, async-capable
    "webplatform.middleware.SessionMiddleware",
    "webplatform.middleware.LocaleMiddleware",
    "webplatform.middleware.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "webplatform.middleware.AuthenticationMiddleware",
    "webplatform.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "webplatform.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
            ],
        },
    },
]

WSGI_APPLICATION = "webplatform.wsgi.application"
ASGI_APPLICATION = "webplatform.asgi.application"

# --- Database -------------------------------------------------------------------------
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{_VAR_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Lets several test runs share one PostgreSQL server without clashing on the test database.
if env.str("TEST_DATABASE_NAME", default=""):
    DATABASES["default"]["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, quotas, channel layer, queue ---------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
EMBEDDED = not REDIS_URL
# Every web-side Redis connection (cache, quotas, inference client; tenants/redis_options.py,
# docs/reliability.md): a down or hung Redis fails a call within these timeouts and the
# request gets 503 service_unavailable with this retry-after; a pooled connection idle longer
# than the health-check interval is PINGed before reuse (dropped when dead, as after a
# restart); connection errors are retried this many times with backoff (never timeouts).
REDIS_SOCKET_TIMEOUT_SECONDS = env.float("REDIS_SOCKET_TIMEOUT_SECONDS", default=0.5)
REDIS_CONNECT_TIMEOUT_SECONDS = env.float("REDIS_CONNECT_TIMEOUT_SECONDS", default=0.5)
REDIS_HEALTH_CHECK_SECONDS = env.float("REDIS_HEALTH_CHECK_SECONDS", default=1.0)
REDIS_RETRIES = env.int("REDIS_RETRIES", default=3)
REDIS_UNAVAILABLE_RETRY_AFTER = env.int("REDIS_UNAVAILABLE_RETRY_AFTER", default=1)

if REDIS_URL:
    _redis_pool_options = redis_options(
        socket_timeout_s=REDIS_SOCKET_TIMEOUT_SECONDS,
        connect_timeout_s=REDIS_CONNECT_TIMEOUT_SECONDS,
        health_check_s=REDIS_HEALTH_CHECK_SECONDS,
        retries=REDIS_RETRIES,
    )
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="wp"),
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_TIMEOUT": REDIS_SOCKET_TIMEOUT_SECONDS,
                "SOCKET_CONNECT_TIMEOUT": REDIS_CONNECT_TIMEOUT_SECONDS,
                "CONNECTION_POOL_KWARGS": {
                    "health_check_interval": _redis_pool_options["health_check_interval"],
                    "retry": _redis_pool_options["retry"],
                },
            },
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 defaults to a 5 s socket timeout, as long as channels-redis's
            # blocking read: every receive would time out (channels_redis#422).
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_timeout": None,
                        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
                        "health_check_interval": REDIS_HEALTH_CHECK_SECONDS,
                    }
                ],
                "prefix": env.str("CHANNEL_PREFIX", default="asgi"),
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Celery ---------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=EMBEDDED)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# webplatform.dashboard is a package of the webplatform app, which autodiscovery does not scan.
CELERY_IMPORTS = ["webplatform.dashboard.tasks"]
CELERY_BEAT_SCHEDULE = {
    "content-log-purge": {
        "task": "webplatform.dashboard.tasks.content_log_purge_task",
        "schedule": crontab(hour=0, minute=20),
    },
    # Roll up yesterday's usage shortly after midnight UTC (the task defaults to yesterday).
    "usage-rollup-daily": {
        "task": "tenants.tasks.usage_rollup_day_task",
        "schedule": crontab(hour=0, minute=5),
    },
}

# --- Auth, sessions, security ---------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
SECURE_COOKIES = env.bool("SECURE_COOKIES", default=not DEBUG and not EMBEDDED)
SESSION_COOKIE_SECURE = SECURE_COOKIES
CSRF_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_HTTPONLY = True
if env.bool("SECURE_PROXY_SSL", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Production (the same switch as the secure cookies): browsers are told to use HTTPS only for
# a year (sent on HTTPS responses; behind a TLS proxy set SECURE_PROXY_SSL). Redirecting
# plain HTTP is the proxy's job unless SECURE_SSL_REDIRECT is set (probes reach pods by
# plain HTTP). Django's defaults already send nosniff, Referrer-Policy same-origin,
# Cross-Origin-Opener-Policy same-origin and X-Frame-Options DENY.
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if SECURE_COOKIES else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy on every response (django-csp; Django 5.2 has none of its own):
# scripts, styles, fonts and frames only from this site, no inline script or style, no
# plugins, no framing. The dashboard's scripts (playground, charts) are static files; the
# playground shows chosen images as data:/blob: URLs and talks to /ws/chat/ ('self'
# covers ws:/wss: of the same host).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:", "blob:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

# --- I18n -----------------------------------------------------------------------------
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(_VAR_DIR / "static")))
try:  # WhiteNoise warns at every start when the folder is missing (before collectstatic)
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
except OSError:  # a read-only image: collectstatic ran at build time
    pass
STATICFILES_DIRS: list = [p for p in [BASE_DIR / "webplatform" / "static"] if p.exists()]
# Front-end libraries come from npm (`npm ci` in the Makefile), never from a CDN.
_CHARTJS_DIST = BASE_DIR / "node_modules" / "chart.js" / "dist"
if _CHARTJS_DIST.exists():
    STATICFILES_DIRS.append(("vendor/chartjs", _CHARTJS_DIST))

DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="no-reply@localhost")
LOGIN_FAILURES_PER_USER = env.int("LOGIN_FAILURES_PER_USER", default=5)
LOGIN_FAILURES_PER_IP = env.int("LOGIN_FAILURES_PER_IP", default=50)
LOGIN_LOCKOUT_SECONDS = env.int("LOGIN_LOCKOUT_SECONDS", default=900)
# Console by default; SMTP with EMAIL_URL=smtp+tls://user:password@host:587 (django-environ).
if env.str("EMAIL_URL", default=""):
    vars().update(env.email_url("EMAIL_URL"))
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"

# --- DRF ------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "webplatform.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Vision inference platform API",
    "DESCRIPTION": "OpenAI-compatible chat completions over GLM-4.6V-Flash.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Docs assets are served by the project (drf-spectacular-sidecar), never from a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # The assistant's role is one enum of the request's messages and of the answer.
    "ENUM_NAME_OVERRIDES": {"AssistantRoleEnum": ["assistant"]},
}

# --- Tenancy --------------------------------------------------------------------------
# How long a process may trust a cached API key lookup. Revocation also bumps a version
# in the shared cache, so this bounds only the damage of a lost invalidation.
API_KEY_CACHE_SECONDS = env.int("API_KEY_CACHE_SECONDS", default=30)
API_KEY_LAST_USED_RESOLUTION_SECONDS = env.int("API_KEY_LAST_USED_RESOLUTION_SECONDS", default=60)
# Quota counters: "redis" (shared by every process) or "local" (one process: the embedded
# mode and tests); empty picks redis when REDIS_URL is set.
QUOTA_BACKEND = env.str("QUOTA_BACKEND", default="")
QUOTA_KEY_PREFIX = env.str("QUOTA_KEY_PREFIX", default="quota")
# A concurrency lease not released by then (a crashed web process) expires on its own.
QUOTA_LEASE_SECONDS = env.int("QUOTA_LEASE_SECONDS", default=600)

# --- Inference ------------------------------------------------------------------------
# Served model name -> {"path": local dir or hub id, "dtype": ..., "device": ...}.
_DEFAULT_MODELS = {
    "glm-4.6v-flash": {
        "path": str(_VAR_DIR / "tiny-glm4v"),
        "dtype": "float32",
        "device": "auto",
    },
    "ocr-lite": {"kind": "ocr-lite"},
}
INFERENCE_MODELS: dict[str, dict[str, str]] = json.loads(
    env.str("INFERENCE_MODELS", default="") or json.dumps(_DEFAULT_MODELS)
)
INFERENCE_TRANSPORT = env.str("INFERENCE_TRANSPORT", default="inprocess" if EMBEDDED else "redis")
# Embedded mode: load in-process models when the ASGI app starts (tests load them on demand).
INFERENCE_PRELOAD = env.bool("INFERENCE_PRELOAD", default=not TESTING)
INFERENCE_REDIS_URL = env.str("INFERENCE_REDIS_URL", default=REDIS_URL)
INFERENCE_BLOB_TTL_SECONDS = env.int("INFERENCE_BLOB_TTL_SECONDS", default=900)
INFERENCE_REPLY_TTL_SECONDS = env.int("INFERENCE_REPLY_TTL_SECONDS", default=300)
# Liveness (docs/reliability.md): a worker renews its heartbeat key this often, with a TTL
# of three beats (at least 1 s); a worker whose key expired is dead for routing at once, and
# its requests are taken over by another once idle this long.
INFERENCE_CLAIM_IDLE_MS = env.int("INFERENCE_CLAIM_IDLE_MS", default=2000)
INFERENCE_HEARTBEAT_SECONDS = env.float("INFERENCE_HEARTBEAT_SECONDS", default=0.25)
# How long a web process reuses a model's health (live workers, queue) for routing: one
# round trip per model a few times a second instead of one per request.
INFERENCE_HEALTH_CACHE_SECONDS = env.float("INFERENCE_HEALTH_CACHE_SECONDS", default=0.25)
INFERENCE_KEY_PREFIX = env.str("INFERENCE_KEY_PREFIX", default="inference")
# How long a client waits for a whole answer; workers skip requests queued longer than this.
INFERENCE_REQUEST_TIMEOUT_SECONDS = env.float("INFERENCE_REQUEST_TIMEOUT_SECONDS", default=600.0)
# A request that killed this many workers is given up as poison.
INFERENCE_MAX_DELIVERIES = env.int("INFERENCE_MAX_DELIVERIES", default=3)

# --- Answer cache and degradation -----------------------------------------------------
ANSWER_CACHE_TTL_SECONDS = env.int("ANSWER_CACHE_TTL_SECONDS", default=3600)
ANSWER_CACHE_KEY_PREFIX = env.str("ANSWER_CACHE_KEY_PREFIX", default="answer")
# Refuse (or fall back) when a model's queue holds more than this many requests per free
# batch slot of its live workers: beyond it a request would wait too long to start.
MODEL_MAX_QUEUE_PER_SLOT = env.int("MODEL_MAX_QUEUE_PER_SLOT", default=4)
MODEL_UNAVAILABLE_RETRY_AFTER = env.int("MODEL_UNAVAILABLE_RETRY_AFTER", default=10)
MODEL_OVERLOADED_RETRY_AFTER = env.int("MODEL_OVERLOADED_RETRY_AFTER", default=2)
# Fast/slow routing of model "auto" (webplatform/completions/model_choice.py, docs/routing.md):
# a JSON object whose keys replace those of DEFAULT_ROUTING there ({} keeps the defaults).
ROUTING: dict[str, object] = json.loads(env.str("ROUTING", default="") or "{}")
METRICS_TOKEN = env.str("METRICS_TOKEN", default="").strip()
CHAT_TICKET_SECONDS = env.int("CHAT_TICKET_SECONDS", default=60)

# --- Uploads --------------------------------------------------------------------------
CLAMD_URL = env.str("CLAMD_URL", default="")  # tcp://host:3310 or unix:///path/to/clamd.ctl
if CLAMD_URL:  # a malformed address stops the process here, not every upload with a 500
    clamd_address_parse(CLAMD_URL)
CLAMD_REQUIRED = env.bool("CLAMD_REQUIRED", default=not EMBEDDED)
CLAMD_TIMEOUT_SECONDS = env.float("CLAMD_TIMEOUT_SECONDS", default=15.0)
# Scans of one web process at clamd at once, their verdicts not read yet (the request goes on
# meanwhile: webplatform/completions/validation.py); more wait for a slot. Keep web processes
# x this within clamd's MaxThreads + MaxQueue (10 + 100 by default) per clamd replica.
CLAMD_MAX_SCANS_IN_FLIGHT = env.int("CLAMD_MAX_SCANS_IN_FLIGHT", default=32)
REMOTE_IMAGE_FETCH_TIMEOUT_SECONDS = env.float("REMOTE_IMAGE_FETCH_TIMEOUT_SECONDS", default=10.0)
IMAGE_MAX_PIXELS = env.int("IMAGE_MAX_PIXELS", default=40_000_000)
IMAGE_MAX_PER_REQUEST = env.int("IMAGE_MAX_PER_REQUEST", default=4)
# The most pixels a model sees of one image (larger images are scaled down at validation;
# webplatform/uploads/budget.py says why these figures): detail auto and low, and the
# prompt tokens kept free for text when detail high sizes an image from the context.
IMAGE_PIXEL_BUDGET = env.int("IMAGE_PIXEL_BUDGET", default=1_254_400)
IMAGE_PIXEL_BUDGET_LOW = env.int("IMAGE_PIXEL_BUDGET_LOW", default=200_704)
IMAGE_BUDGET_TEXT_RESERVE = env.int("IMAGE_BUDGET_TEXT_RESERVE", default=2048)

# --- Hostile input (docs/reliability.md, "Hostile input") -----------------------------
# Checked before any work: the characters of text in one request (history included),
# refused before tokenizing (more than a 128k-token context holds at ~3 characters a token);
# the nesting of a JSON body; the bytes of any HTTP body, cut by the ASGI layer
# (webplatform/asgi_limits.py) before Django buffers them: at least the largest plan's
# chat body (its images at their largest in base64 plus the text), which the view checks.
CHAT_MAX_TEXT_CHARS = env.int("CHAT_MAX_TEXT_CHARS", default=400_000)
REQUEST_JSON_MAX_DEPTH = env.int("REQUEST_JSON_MAX_DEPTH", default=32)
REQUEST_BODY_MAX_BYTES = env.int("REQUEST_BODY_MAX_BYTES", default=128 * 1024 * 1024)
# A slow client: the body must arrive within this many seconds of the headers, with no
# gap between two of its chunks longer than the idle limit (408, connection closed). The
# header deadline is the server's (webplatform/server.py, HTTP_HEADER_TIMEOUT_SECONDS).
REQUEST_BODY_TIMEOUT_SECONDS = env.float("REQUEST_BODY_TIMEOUT_SECONDS", default=120.0)
REQUEST_BODY_IDLE_SECONDS = env.float("REQUEST_BODY_IDLE_SECONDS", default=15.0)
# How long an unknown API key id is remembered as unknown (no database query meanwhile);
# creating a key with that id forgets it at once.
API_KEY_UNKNOWN_CACHE_SECONDS = env.int("API_KEY_UNKNOWN_CACHE_SECONDS", default=60)
REMOTE_IMAGE_HOST_ALLOWLIST = env.list("REMOTE_IMAGE_HOST_ALLOWLIST", default=[])

# LOG_FORMAT=json: one JSON object per line (structlog renders the standard logging records),
# with the same formatter and redaction as the inference workers (inference/worker/logs.py:
# an API key loses its secret part, bearer tokens and ticket/token query values are masked).
# uvicorn's access and error logs go through it too (Django configures logging after
# uvicorn, so this wins).
LOG_FORMAT = env.str("LOG_FORMAT", default="plain").strip().lower()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "inference.worker.logs.json_formatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "uvicorn.access": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
