"""The GPU benchmark's one-call script, run end to end on the CPU with the tiny model.

A lent GPU host gives a session minutes, not hours: ``scripts/device-bench.sh`` must work the
first time it runs there. This runs the same script (the same stages, records and tables)
with the tiny model on the CPU, so a broken stage shows up here, not on the device.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.enginebench import record, report

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 4
SMALL = [
    "--concurrency", "1", "2",
    "--new-tokens", str(NEW_TOKENS),
    "--image-size", "56",
    "--question-tokens", "8",
    "--sustained-requests", "5",
    "--steps", "3",
    "--repeat", "1",
    "--large-count", "2",
    "--streams", "2",
    "--large-image", "112",
    "--images", "3",
]  # fmt: skip
# The suite's own stage lists, at CPU size (the device script passes GPU sizes).
SUITE_SMALL = ["--batches", "1", "2", "--sustained", "2", "3", "--variants", "sdpa:eager"]


@pytest.fixture(scope="module")
def device_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    """Both calls of ``scripts/device-bench.sh`` as the device runs them (``python3`` being
    this Python): their records together, and the first call's output."""
    tmp = tmp_path_factory.mktemp("device-bench")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    records: list[dict] = []
    outputs = []
    parts = (
        ("1", ["--mixed-sizes", "112", "--mixed-budgets", "16", "off"]),
        ("2", ["--static-batches", "1", "2"]),
    )
    for part, extra in parts:
        out = tmp / f"out{part}"
        env = dict(
            os.environ,
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            OUT=str(out),
            MODEL_ARGS="",
            WHEELS="",
        )
        done = subprocess.run(
            ["bash", "scripts/device-bench.sh", part, *SMALL, *SUITE_SMALL, *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records += record.load(out / "engine-bench.jsonl")
        outputs.append((out, done.stdout))
    return records, outputs


@pytest.mark.slow
def test_every_stage_of_the_suite_runs_and_is_recorded(device_run):
    records, outputs = device_run
    assert [r for r in records if r["stage"] == "error"] == []
    skipped = [r["what"] for r in records if r["stage"] == "skipped"]
    # Each stage ran in exactly one of the two calls.
    assert sorted(skipped) == sorted(
        ["naive", "static", "startup", "check", "kernels", "variants", "engine", "mixed"]
    )
    stages = {r["stage"] for r in records}
    assert {
        "meta",
        "check",
        "kernels",
        "variant_build",
        "engine_build",
        "decoder_step",
        "engine_step",
        "run",
        "ttft_stages",
        "sustained",
        "profile",
        "startup",
        "static_compile",
        "mixed",
    } <= stages
    steps = {(r["variant"], r["batch"]) for r in records if r["stage"] == "decoder_step"}
    assert steps == {(v, b) for v in ("default", "sdpa:eager") for b in (1, 2)}
    engine_steps = {(r["variant"], r["batch"]) for r in records if r["stage"] == "engine_step"}
    assert engine_steps == {("default", 1), ("default", 2), ("sdpa:eager", 2)}
    runs = {(r["path"], r["streams"]): r for r in records if r["stage"] == "run"}
    assert set(runs) == {
        ("engine", 1),
        ("engine", 2),
        ("naive", 1),
        ("naive", 2),
        ("static", 1),
        ("static", 2),
    }
    # Every path generated exactly the standard number of tokens for every request.
    assert all(r["tokens"] == [NEW_TOKENS] for r in runs.values())
    assert all(r["ttft_mean"] > 0 and r["e2e_mean"] >= r["ttft_mean"] for r in runs.values())
    loops = {r["concurrency"]: r for r in records if r["stage"] == "sustained"}
    assert set(loops) == {2, 3} and all(r["requests"] == 5 for r in loops.values())
    # The fast paths agree with the model's own forward (float32 on the CPU).
    for check in (r for r in records if r["stage"] == "check"):
        assert check["prefill_logits"] < 1e-4 and check["decode_logits"] < 1e-4, check
        assert check["vision"] < 1e-4 and check["prefill_argmax_agrees"], check
    startups = {r["compile_cache"]: r for r in records if r["stage"] == "startup"}
    assert set(startups) == {"cold", "warm"}
    for startup in startups.values():
        assert startup["start_to_ready_s"] > startup["load_s"] + startup["warmup_s"] > 0
    budgets = [(r["budget"], r["chunk_vision"]) for r in records if r["stage"] == "mixed"]
    assert budgets == [("16", True), ("off", False)]
    first_out = outputs[0][0]
    assert (first_out / "versions.txt").read_text().startswith("python ")
    assert "aten::" in (first_out / "profile-decode.txt").read_text()


@pytest.mark.slow
def test_the_markdown_holds_the_issue_tables_with_the_engine_figures(device_run):
    records, outputs = device_run
    out, stdout = outputs[0]
    markdown = (out / "engine-bench.md").read_text()
    assert markdown in stdout  # printed last, where the device tool's output tail shows it
    rows = {
        line.split("|")[1].strip(): line
        for line in report.render(records).splitlines()
        if "|" in line
    }
    alone = rows["one request alone, end to end"].split("|")
    assert alone[4].strip().endswith(" s") and alone[2].strip().endswith(" s")  # engine, naive
    assert "n/a (not a GPU)" in rows["time to first token, idle"]
    assert re.fullmatch(r"\d+\.\d ms", rows["vision tower, one image"].split("|")[4].strip())
    for n in (32, 128):  # not run at this size: reported as such, not invented
        assert "not measured" in rows[f"standard requests/s, {n} in flight, sustained"]


@pytest.mark.slow
def test_rendering_into_the_docs_replaces_one_marked_section(device_run, tmp_path):
    records, _ = device_run
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    for _ in range(2):  # a second rendering replaces the first
        report.replace_section(doc, report.render(records))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count(report.BEGIN) == text.count(report.END) == 1
    assert "| one request alone, end to end |" in text
    assert "s (batch 1), " in text and "s (batch 2) |" in text  # static compiles
    assert "Skipped" not in text  # each stage ran in one of the two calls


def test_a_stage_past_the_budget_is_skipped_and_recorded(tmp_path):
    recorder = record.Recorder(tmp_path, budget_s=0.0)
    ran = []
    assert recorder.stage("static", 10.0, lambda: ran.append(1)) is False
    assert ran == []
    recorder.close()
    [skipped] = record.load(tmp_path / "engine-bench.jsonl")
    assert skipped["stage"] == "skipped" and skipped["what"] == "static"


def test_a_failing_stage_is_recorded_and_the_run_goes_on(tmp_path):
    recorder = record.Recorder(tmp_path, budget_s=None)

    def broken() -> None:
        raise RuntimeError("no graph")

    assert recorder.stage("decoder steps", 1.0, broken) is False
    assert recorder.stage("naive", 1.0, lambda: recorder.add("run", path="naive")) is True
    recorder.close()
    lines = (tmp_path / "engine-bench.jsonl").read_text().splitlines()
    assert [json.loads(line)["stage"] for line in lines] == ["error", "run"]
    assert "RuntimeError: no graph" in lines[0]


def test_targets_are_judged_only_on_a_gpu():
    records = [
        {"stage": "meta", "device_type": "cuda"},
        {"stage": "run", "path": "engine", "streams": 1, "e2e_mean": 0.7, "ttft_mean": 0.04},
    ]
    rows = "\n".join(report.issue_table(records))
    assert "| 0.70 s | <= 0.45 s | **no** |" in rows
    assert "| 40.0 ms | <= 40 ms | yes |" in rows
    records[0]["device_type"] = "cpu"
    assert "n/a (not a GPU)" in "\n".join(report.issue_table(records))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode_args",
    [
        ["--mode", "throughput", "--paths", "engine", "naive", "static"],
        ["--mode", "mixed", "--mixed-budgets", "16", "off"],
    ],
    ids=["throughput", "mixed"],
)
def test_the_cpu_modes_docs_benchmarks_quotes_still_run(mode_args):
    """docs/benchmarks.md quotes the throughput and mixed modes for its CPU figures."""
    done = subprocess.run(
        [sys.executable, "benchmarks/engine.py", *mode_args, *SMALL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if "throughput" in mode_args:
        assert "ratio engine/naive" in done.stdout
        assert {line.split("|")[1].strip() for line in done.stdout.splitlines() if "|" in line} >= {
            "engine",
            "naive",
            "static",
        }
    else:
        assert "off |" in done.stdout and "16 |" in done.stdout
