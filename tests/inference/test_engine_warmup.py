"""Engine.warmup(): every decode shape once (captured into graphs on CUDA), before serving."""

from __future__ import annotations

import os

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
    # Batch buckets 1, 2, 4 x KV buckets 64 ... 600 (from 512 on CUDA): each shape ran
    # twice, greedy and with sampling in the step (each a graph of its own on CUDA).
    kv_lengths = (64, 128, 256, 512, 600)
    assert engine.decoder.kv_lengths == kv_lengths
    assert engine.decoder.runs == {(b, k): 2 for b in (1, 2, 4) for k in kv_lengths}
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
    assert engine.decoder.runs == {(1, 64): 2, (2, 64): 2}
    engine.add_request(chat_request("r", "Hi", max_tokens=3), {})
    assert isinstance(run_to_completion(engine)[-1][1], DoneEvent)
    cold = engine_from_spec({**spec, "warmup": False})
    assert cold.stats().warmup_seconds is None and not cold.decoder.runs


def test_engine_settings_come_from_the_model_spec():
    from inference.engine import EngineConfig, config_from_spec

    config = config_from_spec(
        {
            "path": "unused",
            "max_batch_size": 16,
            "max_seq_len": 4096,
            "prefill_budget_tokens": 512,
            "idle_prefill_budget_tokens": 4096,
            "chunk_vision": False,
            "decode_kv_lengths": [512, 2048],
            "decode_attention": "flex",
            "compile_decode": True,
            "compile_prefill": False,
            "eager_batch_sizes": [1, 2],
            "compile_mode": "max-autotune-no-cudagraphs",
            "compile_cache_dir": "/var/cache/inductor",
            "capture_sampling": False,
            "cuda_graphs": False,
            "gpu_memory_fraction": 0.8,
        }
    )
    assert config == EngineConfig(
        max_batch_size=16,
        max_seq_len=4096,
        prefill_budget_tokens=512,
        idle_prefill_budget_tokens=4096,
        chunk_vision=False,
        decode_kv_lengths=(512, 2048),
        decode_attention="flex",
        compile_decode=True,
        compile_prefill=False,
        eager_batch_sizes=(1, 2),
        compile_mode="max-autotune-no-cudagraphs",
        compile_cache_dir="/var/cache/inductor",
        capture_sampling=False,
        cuda_graphs=False,
        gpu_memory_fraction=0.8,
    )
    # null: the field's own None default (decided per device)
    nulls = config_from_spec({"path": "unused", "max_batch_size": None, "compile_decode": None})
    assert nulls.max_batch_size is None and nulls.compile_decode is None
    assert config_from_spec({"path": "unused"}) == EngineConfig()
    with pytest.raises(ValueError):
        config_from_spec({"path": "unused", "decode_attention": "model"})
    with pytest.raises(ValueError):
        config_from_spec({"path": "unused", "prefill_budget_tokens": 0})


@pytest.mark.slow
def test_compiled_decode_keeps_its_kernels_in_the_configured_cache(
    tiny_runner, tmp_path, monkeypatch
):
    """What a restarted worker reuses: inductor's compiled code lands in compile_cache_dir."""
    from inference.engine import Engine, EngineConfig

    # Restored after the test (the engine sets it for the whole process, as a worker wants).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    cache_dir = tmp_path / "inductor"
    engine = Engine(
        tiny_runner,
        EngineConfig(
            max_batch_size=1,
            max_seq_len=64,
            compile_decode=True,
            capture_sampling=False,
            compile_cache_dir=str(cache_dir),
        ),
    )
    engine.warmup()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir)
    assert any(path.is_file() for path in cache_dir.rglob("*"))
    stats = engine.stats()
    assert stats.compiled_batch_sizes == (1,) and stats.compile_error is None
    engine.add_request(chat_request("r", "Hi", max_tokens=3), {})
    assert isinstance(run_to_completion(engine)[-1][1], DoneEvent)
