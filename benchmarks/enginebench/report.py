"""The record of a benchmark run and its Markdown tables.

``Recorder`` appends one JSON object per measurement to ``engine-bench.jsonl`` as soon as it
is taken (a run cut short by its time limit keeps what it measured), and keeps the time
budget: a stage whose estimate no longer fits is recorded as skipped, not started.
``render`` turns a record into Markdown: the issue's table (naive ``generate``, static cache,
engine, target) and the detail tables. ``replace_section`` puts that into
``docs/benchmarks.md`` between two markers.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BEGIN = "<!-- engine-device-run:begin -->"
END = "<!-- engine-device-run:end -->"

# The issue's targets (GPU): figure -> (comparison, value).
TARGETS = {
    "decode_1": ("<=", 8.5),
    "decode_8": ("<=", 9.5),
    "decode_32": ("<=", 11.0),
    "alone_e2e": ("<=", 0.6),
    "sustained": (">=", 16.0),
    "ttft_idle": ("<=", 50.0),
    "start_to_ready": ("<=", 60.0),
}


class Recorder:
    """Measurements of one run, written through to ``out/engine-bench.jsonl``."""

    def __init__(
        self, out: Path | None, budget_s: float | None, *, started: float | None = None
    ) -> None:
        """``started``: the ``time.monotonic()`` the budget counts from (default: now)."""
        self.started = time.monotonic() if started is None else started
        self.budget_s = budget_s
        self.records: list[dict[str, Any]] = []
        self._file = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self._file = (out / "engine-bench.jsonl").open("a", encoding="utf-8")

    def add(self, stage: str, **fields: Any) -> dict[str, Any]:
        record = {"stage": stage, "at_s": round(self.elapsed, 2), **fields}
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        return record

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def allows(self, stage: str, estimate_s: float) -> bool:
        """Whether ``stage`` (about ``estimate_s`` seconds) fits what is left of the budget."""
        if self.budget_s is None or self.elapsed + estimate_s <= self.budget_s:
            return True
        self.add(
            "skipped",
            what=stage,
            reason=f"time budget: {self.elapsed:.0f}s used of {self.budget_s:.0f}s, "
            f"stage needs ~{estimate_s:.0f}s",
        )
        print(f"[skipped] {stage}: over the time budget", flush=True)
        return False

    def stage(self, name: str, estimate_s: float, fn: Callable[[], None]) -> bool:
        """Run ``fn`` if it fits the budget; an exception is recorded and the run goes on
        (one failed stage must not lose the others' figures). Returns whether it ran clean."""
        if not self.allows(name, estimate_s):
            return False
        print(f"[stage] {name} (at {self.elapsed:.0f}s)", flush=True)
        try:
            fn()
        except Exception as exc:
            self.add("error", what=name, message=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
            return False
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- rendering
def _find(records: Iterable[dict], stage: str, **match: Any) -> dict | None:
    found = None
    for record in records:
        if record["stage"] == stage and all(record.get(k) == v for k, v in match.items()):
            found = record  # the last one wins (a rerun appends)
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _met(key: str, value: float | None, on_gpu: bool) -> str:
    if value is None:
        return "not measured"
    if not on_gpu:
        return "n/a (not a GPU)"
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "yes" if ok else "**no**"


def issue_table(records: list[dict]) -> list[str]:
    """The issue's table: one row per figure, columns naive / static / engine / target."""
    meta = _find(records, "meta") or {}
    on_gpu = meta.get("device_type") == "cuda"

    def run(path: str, n: int) -> dict:
        return _find(records, "run", path=path, streams=n) or {}

    rows = [
        "| figure | naive `generate` | static cache + compile | engine | target | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for batch in (1, 8, 32):
        plain = (_find(records, "engine_step", batch=batch, variant="default") or {}).get(
            "median_s"
        )
        compiled = (_find(records, "engine_step", batch=batch, variant="compiled") or {}).get(
            "median_s"
        )
        shown = _ms(plain) + (f" (compiled: {_ms(compiled)})" if compiled is not None else "")
        best = min((v for v in (plain, compiled) if v is not None), default=None)
        rows.append(
            f"| decode step, batch {batch} | {_ms(run('naive', batch).get('decode_step_mean'))} "
            f"| {_ms(run('static', batch).get('decode_step_mean'))} | {shown} "
            f"| <= {TARGETS[f'decode_{batch}'][1]} ms "
            f"| {_met(f'decode_{batch}', None if best is None else best * 1e3, on_gpu)} |"
        )
    alone = run("engine", 1).get("e2e_mean")
    rows.append(
        f"| one request alone, end to end | {_s(run('naive', 1).get('e2e_mean'))} "
        f"| {_s(run('static', 1).get('e2e_mean'))} | {_s(alone)} | <= 0.6 s "
        f"| {_met('alone_e2e', alone, on_gpu)} |"
    )
    sustained = _find(records, "sustained") or {}
    concurrency = sustained.get("concurrency", 32)
    engine_rate = sustained.get("steady_requests_per_s") or sustained.get("requests_per_s")

    def batch_rate(path: str) -> float | None:
        wall = run(path, concurrency).get("wall")
        return concurrency / wall if wall else None

    rows.append(
        f"| standard requests/s, {concurrency} concurrent, sustained "
        f"| {_rate(batch_rate('naive'))} | {_rate(batch_rate('static'))} | {_rate(engine_rate)} "
        f"| >= 16 | {_met('sustained', engine_rate, on_gpu)} |"
    )
    ttft = run("engine", 1).get("ttft_mean")
    rows.append(
        f"| time to first token, idle | {_ms(run('naive', 1).get('ttft_mean'))} "
        f"| {_ms(run('static', 1).get('ttft_mean'))} | {_ms(ttft)} | <= 50 ms "
        f"| {_met('ttft_idle', None if ttft is None else ttft * 1e3, on_gpu)} |"
    )
    startup = _find(records, "startup") or {}
    compiles = [r for r in records if r["stage"] == "static_compile"]
    compile_text = ", ".join(f"{r['seconds']:.1f} s (batch {r['batch']})" for r in compiles)
    ready = startup.get("start_to_ready_s")
    rows.append(
        f"| worker start to ready, warmed | - | {compile_text or '-'} | {_s(ready)} | <= 60 s "
        f"| {_met('start_to_ready', ready, on_gpu)} |"
    )
    return rows


def detail_tables(records: list[dict]) -> list[str]:
    out: list[str] = []
    decoder = [r for r in records if r["stage"] == "decoder_step"]
    steps = {(r["variant"], r["batch"]): r for r in records if r["stage"] == "engine_step"}
    if decoder:
        compiled = _find(records, "compiled_build")
        out += [
            "",
            "Decode step by batch: the fixed-shape step alone (input buffers, graph replay, "
            "logits copy; device time from CUDA events) and the whole engine step (plus "
            "sampling, detokenising, events), medians. `compiled`: the per-layer parts of the "
            "step compiled with inductor for that bucket"
            + (
                f" (compile and capture at warm-up: {_s(compiled['warmup_s'])})."
                if compiled
                else "."
            ),
            "",
            "| batch | variant | step alone, wall | step alone, device | engine step "
            "| engine step p90 |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in sorted(decoder, key=lambda r: (r["batch"], r["variant"])):
            step = steps.get((r["variant"], r["batch"]), {})
            out.append(
                f"| {r['batch']} | {r['variant']} | {_ms(r['wall_median_s'])} "
                f"| {_ms(r.get('device_median_s'))} | {_ms(step.get('median_s'))} "
                f"| {_ms(step.get('p90_s'))} |"
            )
    runs = [r for r in records if r["stage"] == "run"]
    if runs:
        out += [
            "",
            "All requests submitted at once (engine: continuous batching; naive and static: "
            "one left-padded `generate` batch), fastest of the repeats:",
            "",
            "| streams | path | TTFT mean | TTFT max | end to end | tok/s per stream "
            "| tok/s total | wall |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(runs, key=lambda r: (r["streams"], r["path"])):
            out.append(
                f"| {r['streams']} | {r['path']} | {_ms(r['ttft_mean'])} | {_ms(r['ttft_max'])} "
                f"| {_s(r['e2e_mean'])} | {r['stream_tps']:.1f} | {r['total_tps']:.1f} "
                f"| {_s(r['wall'])} |"
            )
    sustained = _find(records, "sustained")
    if sustained:
        out += [
            "",
            f"Closed loop, {sustained['concurrency']} in flight, {sustained['requests']} "
            f"requests: {sustained['requests_per_s']:.1f} req/s over the whole run, "
            f"{_rate(sustained.get('steady_requests_per_s'))} req/s at full occupancy; "
            f"TTFT mean {_ms(sustained['ttft_mean'])}, p99 {_ms(sustained['ttft_p99'])}.",
        ]
    stages = _find(records, "ttft_stages")
    if stages:
        out += ["", "Time to first token by stage (one standard request, idle engine):", ""]
        out += ["| stage | time |", "|---|---:|"]
        for name, value in stages["stages"].items():
            if name != "prompt_tokens":
                out.append(f"| {name} | {_ms(value)} |")
    for profile in (r for r in records if r["stage"] == "profile"):
        device = profile.get("device_ms_per_step")
        out += [
            "",
            f"Profile, {profile['steps']} engine steps decoding batch {profile['batch']}: "
            f"{profile['wall_ms_per_step']:.1f} ms wall per step, "
            + (
                f"{device:.1f} ms of device kernels per step "
                f"({device / profile['wall_ms_per_step']:.0%} of the wall time)."
                if device
                else "no device kernels recorded."
            ),
            "",
            "| kernel / operator | calls | ms per step |",
            "|---|---:|---:|",
        ]
        for top in profile["top"]:
            name = top["name"].replace("|", "\\|")
            out.append(f"| `{name}` | {top['calls']} | {top['ms_per_step']:.3f} |")
    mixed = [r for r in records if r["stage"] == "mixed"]
    if mixed:
        out += [
            "",
            "Mixed load: inter-token latency of running streams while large requests arrive:",
            "",
            "| large requests | prompt tokens | prefill chunk | ITL before p50 | ITL p50 "
            "| ITL p99 | ITL max | large TTFT mean |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mixed:
            what = f"{r['size']} px image" if r["kind"] == "image" else "long text"
            out.append(
                f"| {what} | {r['large_prompt']} | {r['chunk'] or 'off'} "
                f"| {_ms(r['before_p50'])} | {_ms(r['p50'])} | {_ms(r['p99'])} "
                f"| {_ms(r['max'])} | {_ms(r['ttft_mean'])} |"
            )
    startup = _find(records, "startup")
    if startup:
        out += [
            "",
            f"Start to ready ({startup.get('max_seq_len', '?')} tokens per KV slot): "
            f"{_s(startup['start_to_ready_s'])} = interpreter and imports "
            f"{_s(startup['interpreter_and_imports_s'])} + load and KV slots "
            f"{_s(startup['load_s'])} + warm-up {_s(startup['warmup_s'])} "
            f"(checkpoint saved in {_s(startup.get('save_s'))} just before, so its weights were "
            "read from the page cache).",
        ]
    for r in records:
        # Stages left out on purpose (--skip: another call ran them) are not news.
        if r["stage"] == "error" or (r["stage"] == "skipped" and r["reason"] != "--skip"):
            out.append(
                f"\n{r['stage'].capitalize()}: {r['what']}: {r.get('reason') or r.get('message')}"
            )
    return out


def render(records: list[dict]) -> str:
    """Markdown of one or more runs' records (e.g. two device calls of one session)."""
    metas = [r for r in records if r["stage"] == "meta"] or [{}]
    meta = metas[-1]
    build = _find(records, "engine_build") or {}
    lines = [
        f"Device: {meta.get('device', '?')}; torch {meta.get('torch', '?')}, transformers "
        f"{meta.get('transformers', '?')}; {meta.get('model', '?')}, {meta.get('dtype', '?')}; "
        f"run on {meta.get('date', '?')} at commit {meta.get('commit', '?')}.",
        "",
        *(f"Command: `{m.get('command', '?')}`" for m in metas),
        "",
        f"Standard request: {meta.get('prompt_tokens', '?')} prompt tokens "
        f"({meta.get('image_tokens', '?')} image tokens), {meta.get('new_tokens', '?')} new "
        f"tokens. Engine: warm-up {_s(build.get('warmup_s'))} for "
        f"{build.get('shapes', '?')} decode shapes (CUDA graphs: {build.get('graphs', '?')}), "
        f"{build.get('slots', '?')} KV slots.",
        "",
        *issue_table(records),
        *detail_tables(records),
    ]
    return "\n".join(lines) + "\n"


def replace_section(doc: Path, body: str) -> None:
    """Put ``body`` between the markers in ``doc`` (appended with them if absent)."""
    text = doc.read_text()
    block = f"{BEGIN}\n{body}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
