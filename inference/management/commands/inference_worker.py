"""``python manage.py inference_worker --model NAME``: serve one model from the Redis queue.

Loads the model once (from ``settings.INFERENCE_MODELS[NAME]``), joins the model's consumer
group and serves until SIGTERM/SIGINT: then it takes no new requests, finishes the running
batch (at most ``--drain-seconds``) and exits 0. Run several for one model to share the load.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference.client import inference_settings
from inference.worker.loop import Worker, WorkerConfig, default_worker_id
from inference.worker.redis_streams import RedisWorkerTransport

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


class Command(BaseCommand):
    help = "Serve one model's inference requests from the Redis queue until SIGTERM."
    # The worker uses no web code or database: a GPU host must not fail on their checks.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--model", required=True, help="a name in INFERENCE_MODELS")
        parser.add_argument("--worker-id", default=None, help="consumer name (default: unique)")
        parser.add_argument("--max-batch-size", type=int, default=None)
        parser.add_argument(
            "--key-prefix", default=None, help="Redis key prefix (default INFERENCE_KEY_PREFIX)"
        )
        parser.add_argument("--drain-seconds", type=float, default=30.0)

    def handle(self, *args: Any, **options: Any) -> None:
        settings = inference_settings()
        if options["key_prefix"]:
            settings = replace(settings, key_prefix=options["key_prefix"])
        model = options["model"]
        if model not in settings.models:
            raise CommandError(
                f"unknown model {model!r}; INFERENCE_MODELS has {list(settings.models)}"
            )
        if not settings.redis_url:
            raise CommandError(
                "the worker needs INFERENCE_REDIS_URL (or REDIS_URL); in the embedded mode the "
                "web process runs the model itself"
            )
        batch = options["max_batch_size"]
        if batch is not None and batch < 1:
            raise CommandError("--max-batch-size must be at least 1")

        stop = threading.Event()
        install_stop_signals(stop)  # before the (slow) load, so SIGTERM then is clean too

        from inference.engine import EngineConfig
        from inference.worker.engines import engine_for_spec

        started = time.monotonic()
        logger.info("loading model %s from %s", model, settings.models[model].get("path"))
        engine_config = EngineConfig(max_batch_size=batch) if batch else None
        engine = engine_for_spec(settings.models[model], engine_config)
        logger.info("model %s loaded in %.1fs", model, time.monotonic() - started)
        if stop.is_set():
            return

        worker_id = options["worker_id"] or default_worker_id()
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
            drain_timeout_s=options["drain_seconds"],
            max_request_age_s=settings.request_timeout_s,
        )
        try:
            Worker(engine=engine, transport=transport, config=config).run(stop)
        finally:
            transport.close()
