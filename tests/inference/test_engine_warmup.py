"""Engine.warmup(): every decode shape once (captured into graphs on CUDA), before serving."""

from __future__ import annotations

import pytest

from inference.protocol import DoneEvent
from tests.inference.conftest import chat_request, run_to_completion


def _engine(make_engine):
    tokens: dict[str, list[int]] = {}
    engine = make_engine(
        max_batch_size=4,
        max_seq_len=600,
        token_observer=lambda rid, tok: tokens.setdefault(rid, []).append(tok),
    )
    return engine, tokens


def _run(engine, tokens):
    for i, question in enumerate(("What is in the image?", "天气怎么样？", "这是哪里？")):
        engine.add_request(chat_request(f"r{i}", question, max_tokens=8), {})
    run_to_completion(engine)
    return tokens


def test_warmup_runs_each_bucket_and_changes_no_output(make_engine):
    cold, tokens = _engine(make_engine)
    assert cold.stats().warmup_seconds is None
    expected = _run(cold, tokens)

    engine, tokens = _engine(make_engine)
    seconds = engine.warmup()
    assert seconds > 0 and engine.stats().warmup_seconds == seconds
    # Batch buckets 1, 2, 4 x KV buckets 64 ... 600 (from 512 on CUDA): each shape ran once.
    kv_lengths = (64, 128, 256, 512, 600)
    assert engine.decoder.kv_lengths == kv_lengths
    assert engine.decoder.runs == {(b, k): 1 for b in (1, 2, 4) for k in kv_lengths}
    assert engine.stats().decode_batch_sizes == (1, 2, 4)
    assert not engine.stats().cuda_graphs  # CPU
    assert _run(engine, tokens) == expected
    with pytest.raises(RuntimeError):
        engine.add_request(chat_request("late", "Hi", max_tokens=2), {})
        engine.warmup()


def test_engine_from_spec_warms_up_unless_told_not_to(tiny_model_dir):
    from inference.engine import engine_from_spec

    spec = {"path": str(tiny_model_dir), "device": "cpu", "max_batch_size": 2, "max_seq_len": 64}
    engine = engine_from_spec(spec)
    assert engine.stats().warmup_seconds is not None
    assert set(engine.decoder.runs) == {(1, 64), (2, 64)}
    engine.add_request(chat_request("r", "Hi", max_tokens=3), {})
    assert isinstance(run_to_completion(engine)[-1][1], DoneEvent)
    cold = engine_from_spec({**spec, "warmup": False})
    assert cold.stats().warmup_seconds is None and not cold.decoder.runs
