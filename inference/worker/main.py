"""``python -m inference.worker --model NAME``: serve one model from the Redis queue.

Reads its settings from the environment (``inference.worker.settings``: the variables the
web side reads, without Django), loads the model once (``INFERENCE_MODELS[NAME]``), joins the
model's consumer group and serves until SIGTERM/SIGINT: then it takes no new requests,
finishes the running batch (at most ``--drain-seconds``) and exits 0. Run several for one
model to share the load.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from inference.allocator import freeze_loaded_objects, keep_freed_memory
from inference.worker.engines import engine_for_spec
from inference.worker.logs import (
    bind_process,
    configure_logging,
    log_format,
    log_request_finished,
)
from inference.worker.loop import Worker, WorkerConfig, default_worker_id
from inference.worker.metrics import WorkerMetrics
from inference.worker.metrics_server import MetricsServer
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.settings import log_level, worker_settings

logger = logging.getLogger("inference.worker")


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop`` (drain, then exit); a second one exits at once.

    Call from the main thread. Exiting at once is safe: unfinished requests stay pending
    and another worker reclaims them, exactly as after a crash.
    """

    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            logger.warning("second signal %d: exiting now", signum)
            os._exit(1)
        logger.info("signal %d: finishing the running batch, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m inference.worker",
        description="Serve one model's inference requests from the Redis queue until SIGTERM.",
    )
    p.add_argument("--model", required=True, help="a name in INFERENCE_MODELS")
    p.add_argument("--worker-id", default=None, help="consumer name (default: unique)")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument(
        "--prefetch",
        type=int,
        default=int(os.environ.get("INFERENCE_WORKER_PREFETCH") or 4),
        help="requests taken beyond the batch, prepared while it runs (default "
        "INFERENCE_WORKER_PREFETCH, else 4; 0: a request is fetched when a slot frees)",
    )
    p.add_argument(
        "--key-prefix", default=None, help="Redis key prefix (default INFERENCE_KEY_PREFIX)"
    )
    p.add_argument("--drain-seconds", type=float, default=30.0)
    port = os.environ.get("INFERENCE_METRICS_PORT") or None
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(port) if port else None,
        help="serve /metrics, /ready and /live on this port (default INFERENCE_METRICS_PORT; "
        "unset: not served)",
    )
    p.add_argument("--metrics-host", default="0.0.0.0")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until stopped; the process's exit status."""
    args = parser().parse_args(argv)
    configure_logging(log_level(), log_format())  # LOG_FORMAT=json: JSON lines
    settings = worker_settings()
    if args.key_prefix:
        settings = replace(settings, key_prefix=args.key_prefix)
    model = args.model
    if model not in settings.models:
        parser().error(f"unknown model {model!r}; INFERENCE_MODELS has {list(settings.models)}")
    if not settings.redis_url:
        parser().error(
            "the worker needs INFERENCE_REDIS_URL (or REDIS_URL); in the embedded mode the "
            "web process runs the model itself"
        )
    batch = args.max_batch_size
    if batch is not None and batch < 1:
        parser().error("--max-batch-size must be at least 1")
    if args.prefetch < 0:
        parser().error("--prefetch must be at least 0")

    stop = threading.Event()
    install_stop_signals(stop)  # before the (slow) load, so SIGTERM then is clean too
    keep_freed_memory()  # before the load: the model's own allocations follow it too

    spec = dict(settings.models[model])
    worker_id = args.worker_id or default_worker_id()
    bind_process(model=model, worker_id=worker_id)
    metrics = WorkerMetrics(
        model=model, engine_kind=str(spec.get("kind", "glm4v")), on_finished=log_request_finished
    )
    metrics.loading()
    server = None
    if args.metrics_port is not None:  # up during the load: /live answers, /ready says 503
        server = MetricsServer(metrics, host=args.metrics_host, port=args.metrics_port).start()

    started = time.monotonic()
    if batch is not None:
        # Through the spec, so that its other engine settings still apply.
        spec["max_batch_size"] = batch
    logger.info("loading model %s from %s", model, spec.get("path"))
    engine = engine_for_spec(spec)
    frozen = freeze_loaded_objects()  # no full collection walks the model's objects again
    logger.info(
        "model %s loaded in %.1fs (%d objects frozen)", model, time.monotonic() - started, frozen
    )
    if stop.is_set():
        return 0

    transport = RedisWorkerTransport.from_url(
        settings.redis_url, settings=settings, model=model, worker_id=worker_id
    )
    config = WorkerConfig(
        model=model,
        worker_id=worker_id,
        max_batch_size=batch,
        prefetch=args.prefetch,
        heartbeat_s=settings.heartbeat_s,
        # Several times per timeout, and at least once per presence grace, so a dead
        # worker's requests wait little longer than either.
        claim_interval_s=max(
            0.1, min(settings.claim_idle_ms / 1000 / 3, settings.presence_grace_s)
        ),
        max_deliveries=settings.max_deliveries,
        drain_timeout_s=args.drain_seconds,
        max_request_age_s=settings.request_timeout_s,
    )
    try:
        Worker(engine=engine, transport=transport, config=config, observer=metrics).run(stop)
    finally:
        transport.close()
        if server is not None:
            server.close()
    return 0
