"""The gauges a worker's ``/metrics`` reads at scrape time: the engine's last statistics
snapshot (``Engine.stats()``, taken by the loop at every heartbeat) and the worker's
state, as they were then, beside the histograms and counters that ``WorkerMetrics``
applies from the routed events (``inference.worker.metrics``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inference.engine.config import EngineStats


class GaugeSource(Protocol):
    """What the gauges read (``WorkerMetrics``): replaced whole by the loop's thread."""

    model: str
    engine_kind: str
    started_at: float
    last_stats: EngineStats | None
    backlog: int

    @property
    def state(self) -> str: ...

    def is_ready(self) -> bool: ...


class EngineGauges(Collector):
    """The engine's last snapshot and the worker's state, read at scrape time."""

    def __init__(self, metrics: GaugeSource, *, prefix: str) -> None:
        self.metrics = metrics
        self.prefix = prefix

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # unchecked: names depend on nothing registered elsewhere

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self.metrics
        model = m.model
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(self.prefix + name, doc, labels=labels)
            family.add_metric([model], value)
            return family

        state = m.state
        yield gauge(
            "worker_ready",
            "1 when the model is loaded and warmed and the loop takes work (the /ready answer).",
            1.0 if m.is_ready() else 0.0,
        )
        yield gauge(
            "worker_draining",
            "1 after SIGTERM: no new work, the batch finishes.",
            1.0 if state == "draining" else 0.0,
        )
        yield gauge(
            "worker_start_time_seconds",
            "Unix time this worker process started (changes() over it counts restarts).",
            m.started_at,
        )
        info = GaugeMetricFamily(
            self.prefix + "worker_info",
            "Always 1; the worker's engine kind and device as labels.",
            labels=["model_name", "engine_kind", "device"],
        )
        stats = m.last_stats
        info.add_metric([model, m.engine_kind, str(stats.device) if stats else ""], 1.0)
        yield info
        if stats is None:
            return  # loading: no engine to report on yet
        cap = stats.kv_capacity_tokens
        yield gauge(
            "num_requests_running",
            "Requests holding a batch slot (decoding or prefilling).",
            stats.running,
        )
        yield gauge(
            "num_requests_waiting",
            "Requests taken by this worker and waiting for a "
            "batch slot (in the engine or not yet handed to it).",
            stats.waiting + m.backlog,
        )
        yield gauge(
            "num_requests_prefilling",
            "Of the running requests, those whose prompt is still being prefilled.",
            getattr(stats, "prefilling", 0),
        )
        yield gauge("max_batch_size", "Batch slots of this worker.", stats.max_batch_size)
        yield gauge(
            "kv_cache_usage_perc",
            "KV-cache use: 1 means full (0 for engines without one).",
            stats.kv_used_tokens / cap if cap else 0.0,
        )
        yield gauge("kv_cache_used_tokens", "Tokens held in the KV cache.", stats.kv_used_tokens)
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV cache holds at most.", cap)
        yield gauge(
            "generation_tokens_per_second",
            "The engine's generation rate over its recent window.",
            stats.tokens_per_second,
        )
        decoding = getattr(stats, "decoding", 0)
        bucket = getattr(stats, "batch_bucket", 0)
        yield gauge("decode_batch_size", "Rows of the last decode step.", decoding)
        yield gauge(
            "decode_batch_bucket",
            "Padded batch size (compiled shape) of the last decode step.",
            bucket,
        )
        yield gauge(
            "batch_occupancy",
            "Real rows over padded rows of the last decode step (1 when none ran).",
            decoding / bucket if bucket else 1.0,
        )
        p50 = getattr(stats, "step_ms_p50", None)
        p99 = getattr(stats, "step_ms_p99", None)
        if p50 is not None and p99 is not None:
            yield gauge(
                "engine_step_p50_seconds",
                "Median of the engine's recent decoding steps (the engine's own window).",
                p50 / 1e3,
            )
            yield gauge(
                "engine_step_p99_seconds",
                "99th percentile of the engine's recent decoding steps.",
                p99 / 1e3,
            )
        memory = GaugeMetricFamily(
            self.prefix + "memory_used_bytes",
            "Memory the engine holds on its device (CUDA: allocated by torch; CPU: weights "
            "and KV cache, or the process's resident set for ocr-lite).",
            labels=["model_name", "device"],
        )
        memory.add_metric([model, str(stats.device)], stats.memory_bytes)
        yield memory
        for kind in ("hits", "misses"):
            counter = CounterMetricFamily(
                self.prefix + f"image_cache_{kind}",
                f"Image-embedding cache {kind} (a hit skips the vision tower).",
                labels=labels,
            )
            counter.add_metric([model], getattr(stats, f"image_cache_{kind}", 0))
            yield counter
        compiled = tuple(getattr(stats, "compiled_batch_sizes", ()))
        yield gauge(
            "compiled_batch_sizes", "Decode batch buckets running compiled code.", len(compiled)
        )
        yield gauge(
            "decode_batch_sizes",
            "Decode batch buckets the engine has.",
            len(tuple(getattr(stats, "decode_batch_sizes", ()))),
        )
        yield gauge(
            "compile_failed",
            "1 when compiling the decode layer failed (every bucket "
            "then runs eager; the reason is in the log).",
            1.0 if getattr(stats, "compile_error", None) else 0.0,
        )
        yield gauge(
            "cuda_graphs_enabled",
            "1 when decode shapes replay CUDA graphs.",
            1.0 if getattr(stats, "cuda_graphs", False) else 0.0,
        )
        warmup = getattr(stats, "warmup_seconds", None)
        if warmup is not None:
            yield gauge(
                "warmup_seconds",
                "Seconds the engine's warm-up (compile and graph capture) took.",
                warmup,
            )
