"""The standard request and the timed runs: the engine, naive ``generate``, static cache.

Standard request (shared/notes/glm4v.md): one 672x672 image + a ~30-token question, 64 new
tokens, greedy. EOS is disabled on every path (engine: no EOS ids; generate:
``min_new_tokens``) so every request generates exactly its ``max_tokens``. Every request
carries its own image (random pixels, its own seed): no image-cache hit between requests.

Definitions used by every figure:

- TTFT: submit -> first token sampled. For a batched ``generate`` all requests get their
  first token together (the streamer's second ``put``);
- end to end: submit -> last token;
- tokens/s per stream: mean over requests of new tokens / end to end; total: all new tokens
  / wall time;
- decode step: the wall time of one step that decodes ``batch`` rows, device synchronised
  (the engine synchronises once a step anyway, when it reads the sampled tokens). For
  ``generate`` it is derived: (end to end - TTFT) / (new tokens - 1).

Image decoding and preprocessing are inside every timing, on every path.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import msgspec
import torch

from inference.engine import Engine
from inference.engine.decoder import DecodeRows
from inference.protocol import (
    DoneEvent,
    ErrorEvent,
    ImagePart,
    ImageRef,
    InferenceRequest,
    Message,
    SamplingParams,
    StartEvent,
    TextPart,
)

QUESTION_WORDS = (
    "Please look at this picture carefully and describe what you see in it , including the "
    "colours , the objects , the people and what they are doing right now in the scene ."
).split()

Images = dict[str, bytes]


def question(tokenizer: Any, tokens: int) -> str:
    """The fewest whole words of ``QUESTION_WORDS`` (repeated) making ``tokens`` tokens."""

    def words(n: int) -> str:
        return " ".join(QUESTION_WORDS[i % len(QUESTION_WORDS)] for i in range(n))

    def count(n: int) -> int:
        return len(tokenizer(words(n), add_special_tokens=False)["input_ids"])

    low, high = 0, 1
    while count(high) < tokens:
        low, high = high, high * 2
    while low + 1 < high:  # count(low) < tokens <= count(high)
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < tokens else (low, middle)
    return words(high)


def image_blob(size: int, seed: int) -> bytes:
    """A ``size`` x ``size`` image of random pixels as the worker receives it from the web
    side: raw RGB pixels in a binary PPM (``webplatform/uploads/validation.py``)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PPM")
    return buffer.getvalue()


def make_request(
    rid: str, text: str, *, image: tuple[str, int] | None, max_tokens: int
) -> InferenceRequest:
    parts: list[Any] = [TextPart(text)]
    if image is not None:
        parts.insert(0, ImagePart(ImageRef(sha256=image[0], width=image[1], height=image[1])))
    return InferenceRequest(
        request_id=rid,
        tenant_id=f"t{sum(map(ord, rid)) % 4}",
        model="bench",
        messages=[Message(role="user", content=parts)],
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, thinking=False),
    )


def make_requests(
    n: int,
    image_size: int,
    text: str,
    new_tokens: int,
    *,
    first_seed: int = 0,
    distinct: int | None = None,
) -> tuple[list[InferenceRequest], Images]:
    """``n`` standard requests; their images cycle through ``distinct`` different ones
    (None: each its own). Run engines with the image-embedding cache off, so that a repeated
    image still costs its vision pass."""
    pool = min(n, distinct or n)
    images = {f"img{s}": image_blob(image_size, s) for s in range(first_seed, first_seed + pool)}
    requests = [
        make_request(
            f"r{first_seed + i}",
            text,
            image=(f"img{first_seed + i % pool}", image_size),
            max_tokens=new_tokens,
        )
        for i in range(n)
    ]
    return requests, images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tagged(request: InferenceRequest, tag: str, **sampling: Any) -> InferenceRequest:
    """The request under a new id (ids must not repeat while running), sampling changed."""
    changes: dict[str, Any] = {"request_id": f"{request.request_id}-{tag}"}
    if sampling:
        changes["sampling"] = msgspec.structs.replace(request.sampling, **sampling)
    return msgspec.structs.replace(request, **changes)


def _check(rid: str, event: Any) -> None:
    if isinstance(event, ErrorEvent):
        raise RuntimeError(f"request {rid} failed: {event.code}: {event.message}")


# ---------------------------------------------------------------------------- the engine
@dataclass
class Timeline:
    """When each request of a run was submitted, got its first token and finished
    (seconds from the run's start), and how many tokens it generated."""

    submitted: dict[str, float] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0


def drive(
    engine: Engine,
    requests: Sequence[InferenceRequest],
    images: Images,
    *,
    concurrency: int,
    tag: str,
) -> Timeline:
    """Closed loop on a warm, idle engine: ``concurrency`` requests submitted at t=0, the
    next one as each finishes, stepping until all are done. The image cache is cleared first
    so every run pays its vision passes. Request ids get ``tag`` (ids must not repeat)."""
    engine.image_cache.clear()
    waiting = deque(requests)
    timeline = Timeline()

    def submit(now: float) -> None:
        request = _tagged(waiting.popleft(), tag)
        timeline.submitted[request.request_id] = now
        engine.add_request(request, images)

    sync(engine.runner.device)
    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(waiting))):
        submit(0.0)
    while engine.has_unfinished():
        events = engine.step()
        now = time.perf_counter() - t0
        for rid, event in events:
            _check(rid, event)
            if isinstance(event, StartEvent):
                timeline.first[rid] = now
            elif isinstance(event, DoneEvent):
                timeline.last[rid] = now
                timeline.generated[rid] = event.usage.completion_tokens
                if waiting:
                    submit(now)
    timeline.wall = time.perf_counter() - t0
    return timeline


def run_engine(
    engine: Engine, requests: Sequence[InferenceRequest], images: Images, *, tag: str
) -> dict[str, Any]:
    """All ``requests`` submitted at t=0; the figures of ``summary``."""
    t = drive(engine, requests, images, concurrency=len(requests), tag=tag)
    return summary(t.first, t.last, t.generated, t.wall)


def run_sustained(
    engine: Engine,
    requests: Sequence[InferenceRequest],
    images: Images,
    *,
    concurrency: int,
    tag: str,
) -> dict[str, Any]:
    """``concurrency`` requests in flight until all ``requests`` are done.

    ``requests_per_s`` counts all of them over the whole run (ramp-up and drain included);
    ``steady_requests_per_s`` counts the completions after the first ``concurrency``, over
    the time from that completion to the last (the loop at full occupancy).
    """
    t = drive(engine, requests, images, concurrency=concurrency, tag=tag)
    done = sorted(t.last.values())
    ttft = [t.first[rid] - t.submitted[rid] for rid in t.first]
    out: dict[str, Any] = {
        "requests": len(done),
        "concurrency": concurrency,
        "wall": t.wall,
        "requests_per_s": len(done) / t.wall,
        "ttft_mean": statistics.mean(ttft),
        "ttft_p99": percentile(ttft, 0.99),
    }
    if len(done) > concurrency:
        span = done[-1] - done[concurrency - 1]
        out["steady_requests_per_s"] = (len(done) - concurrency) / span if span > 0 else None
    return out


@contextmanager
def decoding(
    engine: Engine,
    requests: Sequence[InferenceRequest],
    images: Images,
    *,
    steps: int,
    tag: str,
) -> Iterator[None]:
    """Inside the block exactly ``len(requests)`` requests decode (their prefills done,
    nothing else waiting), with room for ``steps`` more tokens each; they are cancelled and
    drained on the way out."""
    ids = []
    for request in requests:
        tagged = _tagged(request, tag, max_tokens=steps + 8)
        ids.append(tagged.request_id)
        engine.add_request(tagged, images)
    started: set[str] = set()
    while len(started) < len(ids):
        for rid, event in engine.step():
            _check(rid, event)
            if isinstance(event, StartEvent):
                started.add(rid)
    try:
        yield
    finally:
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()


def timed_steps(engine: Engine, steps: int) -> list[float]:
    """Wall time of each of ``steps`` engine steps (each ends reading its sampled tokens,
    so the device work is inside it)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        for rid, event in engine.step():
            _check(rid, event)
        times.append(time.perf_counter() - t)
    return times


def engine_step_times(
    engine: Engine,
    requests: Sequence[InferenceRequest],
    images: Images,
    *,
    steps: int,
    tag: str,
) -> list[float]:
    """Wall time of ``steps`` engine steps while ``len(requests)`` requests decode:
    sampling, detokenising and events included."""
    with decoding(engine, requests, images, steps=steps, tag=tag):
        return timed_steps(engine, steps)


def decoder_step_times(
    engine: Engine, *, batch: int, position: int, repeats: int
) -> dict[str, list[float]]:
    """The fixed-shape decode step alone (``BucketedDecoder.launch`` + ``collect``: input
    staging, graph replay or eager forward, sampling, the ids back to the host) for
    ``batch`` rows writing ``position``, one step at a time.

    ``wall``: seconds per step, device synchronised. ``device`` (CUDA only): seconds between
    CUDA events around the step, the device's own time for it. The engine must be idle:
    the rows write into free slots."""
    if engine.has_unfinished():
        raise RuntimeError("decoder_step_times needs an idle engine")
    rows = DecodeRows.fresh([1] * batch, [position] * batch, [0] * batch)
    decoder = engine.decoder
    device = engine.runner.device
    cuda = device.type == "cuda"
    for _ in range(3):
        decoder.collect(decoder.launch(rows))
    wall: list[float] = []
    on_device: list[float] = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        launch = decoder.launch(rows)
        if cuda:
            end.record()
        decoder.collect(launch)
        sync(device)
        wall.append(time.perf_counter() - t)
        if cuda:
            on_device.append(start.elapsed_time(end) / 1e3)
    return {"wall": wall, "device": on_device}


# ---------------------------------------------------------------------------- figures
def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(first: dict, last: dict, generated: dict, wall: float) -> dict[str, Any]:
    if not (set(first) == set(last) == set(generated)) or None in first.values():
        raise RuntimeError("a request did not finish or never reported its first token")
    ttft = list(first.values())
    steps = [(last[r] - first[r]) / (generated[r] - 1) for r in last if generated[r] > 1]
    return {
        "ttft_mean": statistics.mean(ttft),
        "ttft_max": max(ttft),
        "e2e_mean": statistics.mean(last.values()),
        "stream_tps": statistics.mean(generated[r] / last[r] for r in last),
        "total_tps": sum(generated.values()) / wall,
        "wall": wall,
        "requests": len(last),
        "tokens": sorted(set(generated.values())),
        "decode_step_mean": statistics.mean(steps) if steps else None,
    }
