"""Engine configuration and the statistics it reports."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class EngineConfig:
    # Running requests sharing one decode step. None: 128 on CUDA (an H200 holds their KV
    # beside the weights many times over), 8 on CPU.
    max_batch_size: int | None = None
    max_seq_len: int = 8192  # KV capacity per slot: prompt + completion tokens
    # KV slots allocated once at start. None: the batch limit, fewer on CUDA if
    # gpu_memory_fraction of the free memory holds fewer.
    num_slots: int | None = None
    gpu_memory_fraction: float = 0.9
    # Prefill work per engine step, in prompt tokens (vision blocks count by their FLOPs in
    # prompt-token equivalents), while streams are decoding: it bounds how long a step (the
    # streams' inter-token gap) can get when large prompts arrive; vLLM's
    # max_num_batched_tokens. Chosen on an H200 by benchmarks/engine.py (docs/benchmarks.md).
    prefill_budget_tokens: int = 2048
    # The same when no stream is decoding: nothing waits on the step, so prefill as much as
    # one packed forward should hold (activation memory grows with it).
    idle_prefill_budget_tokens: int = 8192
    # Spread a vision pass over steps, a few blocks per step within the budget. False: each
    # pass runs whole in the step that starts it (one large image then stalls the streams
    # for all of it; kept to measure what chunking buys).
    chunk_vision: bool = True
    decode_batch_sizes: tuple[int, ...] | None = None  # None: 1, 2, 4, ... up to the limit
    # None: 512, 1024, ... up to max_seq_len on CUDA (each is a graph); from 64 on CPU.
    decode_kv_lengths: tuple[int, ...] | None = None
    decode_attention: str = "grouped"  # text_forward.DECODE_ATTENTION
    cuda_graphs: bool = True  # on CUDA: capture each decode shape, replay it
    # torch.compile the decode layer (once; every bucket reuses it). None: on CUDA only (CPU
    # inductor needs a C++ compiler and gains nothing for the tests' tiny model).
    compile_decode: bool | None = None
    eager_batch_sizes: tuple[int, ...] = ()  # buckets measured not to gain from compiling
    # torch.compile the prefill's layer halves (dynamic in the token count). None: on CUDA.
    compile_prefill: bool | None = None
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    # Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR): a worker restarted on the same host
    # reuses its compiled kernels instead of compiling again. None: a folder under the
    # user's cache directory ($XDG_CACHE_HOME or ~/.cache) that survives restarts.
    compile_cache_dir: str | None = None
    capture_sampling: bool = True  # on CUDA: capture a sampling variant of each shape too
    image_cache_bytes: int = 256 * 2**20  # image-embedding cache; 0 disables it
    # Image decoding threads, off the step loop; 0: inline in step(). None: 2 on CUDA; 0 on
    # CPU, where the model computes on the same cores (no spare core to move the work to).
    preprocess_threads: int | None = None
    preprocess_ahead: int = 4  # requests preprocessed ahead of admission
    tps_window_s: float = 10.0  # window of EngineStats.tokens_per_second
    step_window: int = 512  # engine steps kept for the step-time percentiles
    # Called with (request_id, token_id) for every sampled token, EOS included: for tests
    # and tracing (events carry text, not ids).
    token_observer: Callable[[str, int], None] | None = None

    def __post_init__(self) -> None:
        if min(self.max_batch_size or 1, self.num_slots or 1) < 1:
            raise ValueError("max_batch_size and num_slots must be >= 1")
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        if min(self.prefill_budget_tokens, self.idle_prefill_budget_tokens) < 1:
            raise ValueError("prefill budgets must be >= 1 token")
        if self.decode_attention not in ("grouped", "sdpa", "flex"):
            raise ValueError("decode_attention must be 'grouped', 'sdpa' or 'flex'")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")


def default_compile_cache_dir() -> str:
    """Where compiled decode kernels are kept between worker starts on one host."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glm-engine", "inductor")


@dataclass(frozen=True)
class EngineStats:
    """What every engine kind reports (the worker's heartbeat); ocr-lite returns this type."""

    running: int  # requests holding a slot: decoding + prefilling
    waiting: int
    max_batch_size: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    tokens_per_second: float
    device: str
    memory_bytes: int


@dataclass(frozen=True)
class GlmEngineStats(EngineStats):
    """``EngineStats`` plus what only this engine has (``Engine.stats()`` returns this)."""

    prefilling: int = 0
    decoding: int = 0  # rows of the last decode step
    batch_bucket: int = 0  # its padded batch size
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    warmup_seconds: float | None = None
    decode_batch_sizes: tuple[int, ...] = ()
    cuda_graphs: bool = False
    compiled_batch_sizes: tuple[int, ...] = ()  # buckets whose decode layer is compiled
    compile_error: str | None = None  # why compiling failed (then every bucket is eager)
    step_ms_p50: float | None = None  # engine steps that decoded, recent window
    step_ms_p99: float | None = None

    @property
    def occupancy(self) -> float:
        """Real rows over padded rows of the last decode step (1.0 when none ran)."""
        return self.decoding / self.batch_bucket if self.batch_bucket else 1.0
