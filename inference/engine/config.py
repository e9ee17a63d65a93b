"""Engine configuration and the statistics it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # running requests sharing one decode step
    max_seq_len: int = 4096  # KV capacity per slot: prompt + completion tokens
    # KV slots allocated once at start. None: max_batch_size on CPU; on CUDA as many as
    # gpu_memory_fraction of the free memory holds, at most max_batch_size.
    num_slots: int | None = None
    gpu_memory_fraction: float = 0.9
    prefills_per_step: int = 1  # requests admitted (vision pass, prefill start) per step
    # Prompt tokens prefilled per step: bounds how long a long prompt (a large image) stalls
    # the running streams, at the cost of its own time to first token. 1024 takes the
    # standard request (672 px image, ~620 tokens) in one step and splits 1344 px (~2350)
    # into 3. None: every admitted prompt in one piece. Measure per GPU before changing.
    prefill_chunk_tokens: int | None = 1024
    decode_batch_sizes: tuple[int, ...] | None = None  # None: 1, 2, 4, ... up to the limit
    # None: 512, 1024, ... up to max_seq_len on CUDA (each is a graph); from 64 on CPU.
    decode_kv_lengths: tuple[int, ...] | None = None
    decode_attention: str = "grouped"  # or "model": the model's own (SDPA) attention
    cuda_graphs: bool = True  # on CUDA: capture each decode shape, replay it
    # Decode batch buckets to torch.compile (then capture). Measure each bucket first.
    compile_batch_sizes: tuple[int, ...] = ()
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    # Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR): a worker restarted on the same host
    # reuses its compiled kernels instead of compiling again. None: inductor's default (a
    # folder under the system temp dir, lost with a container's file system).
    compile_cache_dir: str | None = None
    image_cache_bytes: int = 256 * 2**20  # image-embedding cache; 0 disables it
    # Image decoding/preprocessing threads, off the step loop; 0: inline in step().
    # None: 2 on CUDA; 0 on CPU, where the model computes on the same cores (no spare core
    # to move the work to, and extra threads beside torch's slow its own threads down).
    preprocess_threads: int | None = None
    preprocess_ahead: int = 4  # requests preprocessed ahead of admission
    tps_window_s: float = 10.0  # window of EngineStats.tokens_per_second
    # Called with (request_id, token_id) for every sampled token, EOS included: for tests
    # and tracing (events carry text, not ids).
    token_observer: Callable[[str, int], None] | None = None

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.num_slots or 1, self.prefills_per_step) < 1:
            raise ValueError("max_batch_size, num_slots and prefills_per_step must be >= 1")
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1 or None")
        if self.decode_attention not in ("grouped", "model"):
            raise ValueError("decode_attention must be 'grouped' or 'model'")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")


@dataclass(frozen=True)
class EngineStats:
    """What every engine kind reports (the worker's heartbeat; ocr-lite mirrors the fields)."""

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
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    warmup_seconds: float | None = None
    decode_batch_sizes: tuple[int, ...] = ()
    cuda_graphs: bool = False
