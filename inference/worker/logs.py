"""The worker's logs: plain text or JSON lines (``LOG_FORMAT=json``), and one line per request.

JSON lines are rendered by structlog's ``ProcessorFormatter`` from the standard ``logging``
records the worker already writes, so no call site changes: each line has ``timestamp``,
``level``, ``logger``, ``event`` (the message), the fields passed as ``extra=``, and the
process's ``model`` and ``worker_id`` (bound once at start). The web side renders its lines
the same way (``webplatform/settings.py``, ``LOGGING``).

``log_request_finished`` is the worker's request log: one line per finished request with
the ids the web side sent (``request_id``, ``tenant_id``), the outcome and the timings
``WorkerMetrics`` measured, so a request is followed from the web's line to the worker's by
its id. Nothing of its content is logged: no prompt, answer or image.

``redact`` runs last on every line: an API key keeps its prefix and public id and loses its
secret part, a bearer token and a ``ticket``/``token``/``key`` query value are masked.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

import structlog

logger = logging.getLogger("inference.worker.requests")

# ``{prefix}_{public_id}_{secret}`` (tenants/services/api_keys.py): the secret part goes.
_API_KEY = re.compile(r"\b([A-Za-z0-9]{1,16}_[A-Za-z0-9]{8,32}_)[A-Za-z0-9]{16,128}\b")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:ticket|token|key|api_key|access_token)=)[^&\s\"']+")


def redact_text(text: str) -> str:
    text = _API_KEY.sub(r"\1***", text)
    text = _BEARER.sub(r"\1***", text)
    return _QUERY_SECRET.sub(r"\1***", text)


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: ``redact_text`` over every string value of the line."""
    for name, value in event_dict.items():
        if isinstance(value, str):
            event_dict[name] = redact_text(value)
    return event_dict


def json_formatter() -> structlog.stdlib.ProcessorFormatter:
    """A ``logging.Formatter`` writing one JSON object per record."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(),
        ],
    )


def log_format() -> str:
    """``LOG_FORMAT``: ``json`` or ``plain`` (the default), as the web side reads it."""
    return os.environ.get("LOG_FORMAT", "plain").strip().lower() or "plain"


def configure_logging(level: str, fmt: str) -> None:
    """The root logger writes to stderr at ``level``, as JSON lines when ``fmt == "json"``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        # Progress bars (model loading) write to stderr past logging and would break the
        # one-object-per-line stream; transformers and huggingface-hub read this at import.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def bind_process(**fields: str) -> None:
    """Fields every later line of this thread carries (the worker's model and id)."""
    structlog.contextvars.bind_contextvars(**fields)


@dataclass(frozen=True)
class RequestSummary:
    """One finished request, as the worker saw it (``WorkerMetrics`` fills it)."""

    request_id: str
    tenant_id: str
    model: str
    outcome: str  # a FinishReason value (stop, length, cancelled) or "error"
    error_code: str | None
    stream: bool
    queue_s: float | None  # queued (web side) -> admitted here; None: never admitted
    ttft_s: float | None  # queued -> first token
    e2e_s: float | None  # queued -> finished
    prompt_tokens: int
    completion_tokens: int


def log_request_finished(summary: RequestSummary) -> None:
    """The request log line (level INFO; WARNING for an error that was ours)."""
    fields = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(summary).items()}
    ours = summary.error_code in ("internal_error", "out_of_memory", "worker_lost")
    logger.log(logging.WARNING if ours else logging.INFO, "request finished", extra=fields)
