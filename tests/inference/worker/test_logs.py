"""The worker's logs (inference/worker/logs.py): JSON lines, the request log line fed by
``WorkerMetrics``, and the redaction every line goes through."""

from __future__ import annotations

import io
import json
import logging

import msgspec
import structlog

from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FinishReason,
    StartEvent,
    Usage,
)
from inference.worker.logs import (
    RequestSummary,
    json_formatter,
    log_request_finished,
    redact_text,
)
from inference.worker.metrics import WorkerMetrics
from tests.inference.fakes import make_request

KEY = "sk_AbCd1234EfGh5678_" + "s3cr3t" * 6


def capture(name: str = "") -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    target = logging.getLogger(name)
    target.addHandler(handler)
    return target, stream, handler


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_redaction_keeps_the_public_id_and_drops_every_secret_part():
    text = (
        f"auth {KEY} header 'Authorization: Bearer {KEY}' "
        "GET /ws/chat/?ticket=tk_123456&lang=en HTTP/1.1 token=abc ?api_key=zzz"
    )
    redacted = redact_text(text)
    assert "s3cr3t" not in redacted and "tk_123456" not in redacted and "zzz" not in redacted
    assert "sk_AbCd1234EfGh5678_***" in redacted  # the public id still names the key
    assert "Bearer ***" in redacted and "&lang=en" in redacted


def test_a_record_becomes_one_json_line_with_its_extra_fields_and_the_bound_ones():
    logger, stream, handler = capture("test.logs.json")
    logger.setLevel(logging.INFO)
    structlog.contextvars.bind_contextvars(model="m1", worker_id="w-1")
    try:
        logger.info("hello %s", KEY, extra={"request_id": "req_1", "tenant_id": "7"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        structlog.contextvars.clear_contextvars()
        logger.removeHandler(handler)
    first, second = lines(stream)
    assert first["event"] == "hello sk_AbCd1234EfGh5678_***"
    assert first["level"] == "info" and first["logger"] == "test.logs.json"
    assert (first["request_id"], first["tenant_id"]) == ("req_1", "7")
    assert (first["model"], first["worker_id"]) == ("m1", "w-1")
    assert "timestamp" in first
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_the_request_log_line_carries_the_web_sides_ids_and_the_timings():
    seen: list[RequestSummary] = []
    m = WorkerMetrics(model="fake", on_finished=seen.append)
    ok = msgspec.structs.replace(make_request("hi", tenant_id="42"), created_at=0.0)
    m.admitted(ok)
    m.event(ok, StartEvent(prompt_tokens=3))
    m.event(ok, DeltaEvent(text="a", tokens=1))
    m.event(ok, DoneEvent(FinishReason.STOP, Usage(prompt_tokens=3, completion_tokens=1)))
    failed = make_request("x", tenant_id="42")
    m.finished_early(failed, ErrorEvent.fixed(ErrorCode.IMAGE_UNAVAILABLE))
    first, second = seen
    assert (first.request_id, first.tenant_id, first.outcome) == (ok.request_id, "42", "stop")
    assert first.ttft_s is not None and first.e2e_s >= first.ttft_s >= first.queue_s > 0
    assert (first.prompt_tokens, first.completion_tokens) == (3, 1)
    assert (second.outcome, second.error_code, second.queue_s) == (
        "error",
        "image_unavailable",
        None,
    )

    logger, stream, handler = capture("inference.worker.requests")
    try:
        log_request_finished(first)
        log_request_finished(
            RequestSummary(**{**first.__dict__, "outcome": "error", "error_code": "worker_lost"})
        )
    finally:
        logger.removeHandler(handler)
    info, warning = lines(stream)
    assert info["event"] == "request finished" and info["level"] == "info"
    assert info["request_id"] == ok.request_id and info["tenant_id"] == "42"
    assert info["model"] == "fake" and info["outcome"] == "stop"
    assert warning["level"] == "warning"  # a failure of ours stands out
