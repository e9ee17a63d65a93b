"""Inter-token latency of running streams while large prompts arrive (the prefill budget).

``streams`` text requests decode; once they all stream, one large request (a ``size`` px
image, or as many text tokens with ``kind="text"``: the prefill without a vision pass)
arrives every ``every`` steps until ``count`` have come.
Reported: p50/p99/max of the gaps between consecutive tokens of the running streams from the
first arrival to the last large request's first token, the same gap before any arrival
(the plain decode step), and the large requests' TTFT.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from inference.engine import Engine, EngineConfig
from inference.engine.runner import ModelRunner

from .workloads import image_blob, make_request, percentile, question, sync


def run_mixed(
    runner: ModelRunner,
    *,
    config: EngineConfig,
    streams: int = 8,
    size: int = 1344,
    count: int = 4,
    every: int = 10,
    kind: str = "image",
    question_tokens: int = 30,
) -> dict[str, Any]:
    """One mixed-load run on an engine with ``config`` (its batch limit and context are set
    here to what the run needs)."""
    text = question(runner.tokenizer, question_tokens)
    large_new = 8
    if kind == "image":
        images = {f"big{i}": image_blob(size, 100 + i) for i in range(count)}
        large = [
            make_request(f"big{i}", text, image=(f"big{i}", size), max_tokens=large_new)
            for i in range(count)
        ]
    else:
        images = {}
        long_text = question(runner.tokenizer, (size // 28) ** 2)
        large = [
            make_request(f"big{i}", f"{i} {long_text}", image=None, max_tokens=large_new)
            for i in range(count)
        ]
    large_len = runner.prepare(large[0].messages, images, thinking=False).length
    max_seq_len = max(large_len + large_new, 2048)
    stream_len = runner.prepare(
        make_request("s", text, image=None, max_tokens=1).messages, {}, thinking=False
    ).length
    stamps: dict[str, list[float]] = {}
    engine = Engine(
        runner,
        dataclasses.replace(
            config,
            max_batch_size=streams + count,
            max_seq_len=max(config.max_seq_len, max_seq_len),
            token_observer=lambda rid, tok: stamps.setdefault(rid, []).append(time.perf_counter()),
        ),
    )
    try:
        warmup_s = engine.warmup()
        ids = [f"s{i}" for i in range(streams)]
        for rid in ids:
            engine.add_request(
                make_request(rid, text, image=None, max_tokens=max_seq_len - stream_len), {}
            )
        while not all(rid in stamps for rid in ids):
            engine.step()
        for _ in range(5):  # steady state: the plain decode step
            engine.step()
        sync(runner.device)
        arrivals: dict[str, float] = {}
        step = 0
        while len(arrivals) < len(large) or not all(r.request_id in stamps for r in large):
            if len(arrivals) < len(large) and step % every == 0:
                request = large[len(arrivals)]
                arrivals[request.request_id] = time.perf_counter()
                engine.add_request(request, images)
            engine.step()
            step += 1
        sync(runner.device)
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.close()
    window = (min(arrivals.values()), max(stamps[r.request_id][0] for r in large))
    before, during = [], []
    for rid in ids:
        for a, b in zip(stamps[rid], stamps[rid][1:], strict=False):
            if b <= window[0]:
                before.append(b - a)
            elif a >= window[0] and b <= window[1] + 1e-9:
                during.append(b - a)
    ttft = [stamps[r.request_id][0] - arrivals[r.request_id] for r in large]
    return {
        "kind": kind,
        "size": size,
        "prefill_budget": config.prefill_budget_tokens,
        "chunk_vision": config.chunk_vision,
        "streams": streams,
        "large_prompt": large_len,
        "warmup_s": warmup_s,
        # A window can hold no whole gap (a large prompt prefilled within one step).
        "before_p50": percentile(before, 0.5) if before else None,
        "p50": percentile(during, 0.5) if during else None,
        "p99": percentile(during, 0.99) if during else None,
        "max": max(during) if during else None,
        "gaps": len(during),
        "ttft_mean": statistics.mean(ttft),
        "ttft_max": max(ttft),
    }
