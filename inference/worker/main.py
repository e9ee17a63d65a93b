"""``python -m inference.worker --model NAME``: serve one model from the Redis queue.

Reads its settings from the environment (``inference.worker.settings``: the variables the
web side reads, without Django), loads the model once (``INFERENCE_MODELS[NAME]``), joins the
model's consumer group and serves until SIGTERM/SIGINT: then it takes no new requests,
finishes the running batch (at most ``--drain-seconds``) and exits 0. Run several for one
model to share the load.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

from inference.worker.engines import engine_for_spec
from inference.worker.logs import (
    bind_process,
    configure_logging,
    log_format,
    log_request_finished,
)
from inference.worker.loop import Worker, WorkerConfig, default_worker_id
from inference.worker.metrics import MetricsServer, WorkerMetrics
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.settings import log_level, worker_settings

logger = logging.getLogger("inference.worker")

# glibc's mallopt parameters (malloc.h) and the values the worker sets (keep_freed_memory).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's own ceiling for its adaptive threshold
_TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Have glibc's malloc keep memory the engine frees for its next allocation.

    Every request allocates the same tensors again (a step's activations, the image's
    pixels, the blob read from Redis). With glibc's defaults the larger ones come from a
    fresh ``mmap`` and go back to the kernel when freed, and the main heap's top is trimmed
    from 128 KB free, so each request page-faults its working set in anew: about 2,400
    faults (9 MB zeroed by the kernel) per standard request on the tiny CPU model, 5 ms of
    a 48 ms request (``benchmarks/worker_hop.py``). Allocations up to 32 MB from the heap,
    and up to 128 MB free kept at its top, make them reuse warm pages. The process keeps
    that much more resident at its peak; it holds a model many times that size.

    Left alone when the operator tuned malloc (``MALLOC_*_`` or ``GLIBC_TUNABLES``) or the C
    library is not glibc. True when set.
    """
    env = os.environ if environ is None else environ
    if "GLIBC_TUNABLES" in env or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in env
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc (macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl has a mallopt that does nothing and answers 0.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    )


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
    logger.info("model %s loaded in %.1fs", model, time.monotonic() - started)
    if stop.is_set():
        return 0

    transport = RedisWorkerTransport.from_url(
        settings.redis_url, settings=settings, model=model, worker_id=worker_id
    )
    config = WorkerConfig(
        model=model,
        worker_id=worker_id,
        max_batch_size=batch,
        heartbeat_s=settings.heartbeat_s,
        # Several times per timeout, so a dead worker's requests wait little longer.
        claim_interval_s=max(0.1, settings.claim_idle_ms / 1000 / 3),
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
