"""The Markdown tables of a benchmark run's record (``enginebench.record``).

``render`` turns a record into Markdown: the issue's table (naive ``generate``, static
cache, engine, target) and the detail tables. ``replace_section`` puts that into
``docs/benchmarks.md`` between two markers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

BEGIN = "<!-- engine-device-run:begin -->"
END = "<!-- engine-device-run:end -->"

# The GPU issues' targets: figure -> (comparison, value, unit).
TARGETS = {
    "ttft_idle": ("<=", 40.0, "ms"),
    "image_prep": ("<=", 3.0, "ms"),
    "vision": ("<=", 8.0, "ms"),
    "text_prefill": ("<=", 20.0, "ms"),
    "ttft_max_8": ("<=", 150.0, "ms"),
    "ttft_max_32": ("<=", 600.0, "ms"),
    "mixed_itl_p99": ("<=", 60.0, "ms"),
    "mixed_ttft": ("<=", 250.0, "ms"),
    "decode_1": ("<=", 6.0, "ms"),
    "decode_8": ("<=", 6.5, "ms"),
    "decode_32": ("<=", 7.5, "ms"),
    "device_share": (">=", 90.0, "%"),
    "sustained_32": (">=", 20.0, "req/s"),
    "sustained_128": (">=", 32.0, "req/s"),
    "tokens_32": (">=", 900.0, "tok/s"),
    "alone_e2e": ("<=", 0.45, "s"),
    "ready_warm": ("<=", 30.0, "s"),
    "ready_cold": ("<=", 120.0, "s"),
}


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
    op, target, _ = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "yes" if ok else "**no**"


def _target(key: str) -> str:
    op, value, unit = TARGETS[key]
    return f"{op} {value:g} {unit}"


def _stage_time(stages: dict, *names: str) -> float | None:
    values = [stages.get(name) for name in names]
    return None if any(v is None for v in values) else sum(values)  # type: ignore[misc]


def issue_table(records: list[dict]) -> list[str]:
    """The issues' tables: one row per figure, columns naive / static / engine / target."""
    meta = _find(records, "meta") or {}
    on_gpu = meta.get("device_type") == "cuda"

    def run(path: str, n: int) -> dict:
        return _find(records, "run", path=path, streams=n) or {}

    def row(label: str, naive: str, static: str, engine: str, key: str, value: float | None):
        return f"| {label} | {naive} | {static} | {engine} | {_target(key)} | {_met(key, value, on_gpu)} |"

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1e3

    header = [
        "| figure | naive `generate` | static cache + compile | engine | target | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    stages = (_find(records, "ttft_stages") or {}).get("stages", {})
    prep = _stage_time(stages, "image decode (CPU)", "image upload, resize, normalise (device)")
    vision = stages.get("vision tower")
    text = stages.get("text prefill + lm_head")
    ttft = run("engine", 1).get("ttft_mean")
    budget = (_find(records, "engine_build") or {}).get("prefill_budget")
    mixed = _find(records, "mixed", budget=str(budget)) if budget else None
    mixed = mixed or {}
    first = [
        "Time to first token (issue: time to first token under 40 ms):",
        "",
        *header,
        row(
            "time to first token, idle",
            _ms(run("naive", 1).get("ttft_mean")),
            _ms(run("static", 1).get("ttft_mean")),
            _ms(ttft),
            "ttft_idle",
            ms(ttft),
        ),
        row(
            "image decode + preprocess (critical path)", "-", "-", _ms(prep), "image_prep", ms(prep)
        ),
        row("vision tower, one image", "-", "-", _ms(vision), "vision", ms(vision)),
        row("text prefill + lm_head", "-", "-", _ms(text), "text_prefill", ms(text)),
    ]
    for n, key in ((8, "ttft_max_8"), (32, "ttft_max_32")):
        value = run("engine", n).get("ttft_max")
        first.append(
            row(
                f"{n} requests at once: TTFT max",
                _ms(run("naive", n).get("ttft_max")),
                _ms(run("static", n).get("ttft_max")),
                _ms(value),
                key,
                ms(value),
            )
        )
    size = mixed.get("size", "large")
    first.append(
        row(
            f"ITL p99 of {mixed.get('streams', 8)} streams while {size} px images arrive",
            "-",
            "-",
            _ms(mixed.get("p99")),
            "mixed_itl_p99",
            ms(mixed.get("p99")),
        )
    )
    first.append(
        row(
            f"TTFT of those {size} px requests",
            "-",
            "-",
            _ms(mixed.get("ttft_mean")),
            "mixed_ttft",
            ms(mixed.get("ttft_mean")),
        )
    )
    second = ["", "Throughput (issue: decode near the memory floor):", "", *header]
    for batch in (1, 8, 32):
        step = _find(records, "decoder_step", batch=batch, variant="default") or {}
        value = step.get("device_median_s")
        second.append(
            row(
                f"decode step, batch {batch} (device)",
                _ms(run("naive", batch).get("decode_step_mean")),
                _ms(run("static", batch).get("decode_step_mean")),
                _ms(value),
                f"decode_{batch}",
                ms(value),
            )
        )
    profile = _find(records, "profile") or {}
    share = None
    if profile.get("device_ms_per_step") and profile.get("wall_ms_per_step"):
        share = 100.0 * profile["device_ms_per_step"] / profile["wall_ms_per_step"]
    second.append(
        row(
            f"engine step: device kernel time / wall, batch {profile.get('batch', 32)}",
            "-",
            "-",
            "-" if share is None else f"{share:.0f}%",
            "device_share",
            share,
        )
    )
    for n in (32, 128):
        loop = _find(records, "sustained", concurrency=n) or {}
        rate = loop.get("steady_requests_per_s") or loop.get("requests_per_s")

        def batch_rate(path: str, n: int = n) -> float | None:
            wall = run(path, n).get("wall")
            return n / wall if wall else None

        second.append(
            row(
                f"standard requests/s, {n} in flight, sustained",
                _rate(batch_rate("naive")),
                _rate(batch_rate("static")),
                _rate(rate),
                f"sustained_{n}",
                rate,
            )
        )
    tokens = run("engine", 32).get("total_tps")
    second.append(
        row(
            "tokens/s, 32 requests submitted at once",
            _rate(run("naive", 32).get("total_tps")),
            _rate(run("static", 32).get("total_tps")),
            _rate(tokens),
            "tokens_32",
            tokens,
        )
    )
    alone = run("engine", 1).get("e2e_mean")
    second.append(
        row(
            "one request alone, end to end",
            _s(run("naive", 1).get("e2e_mean")),
            _s(run("static", 1).get("e2e_mean")),
            _s(alone),
            "alone_e2e",
            alone,
        )
    )
    compiles = [r for r in records if r["stage"] == "static_compile"]
    compile_text = ", ".join(f"{r['seconds']:.0f} s (batch {r['batch']})" for r in compiles)
    for state, key in (("warm", "ready_warm"), ("cold", "ready_cold")):
        ready = (_find(records, "startup", compile_cache=state) or {}).get("start_to_ready_s")
        second.append(
            row(
                f"worker start to ready, every shape compiled, {state} compile cache",
                "-",
                compile_text or "-",
                _s(ready),
                key,
                ready,
            )
        )
    return first + second


def detail_tables(records: list[dict]) -> list[str]:
    out: list[str] = []
    decoder = [r for r in records if r["stage"] == "decoder_step"]
    steps = {(r["variant"], r["batch"]): r for r in records if r["stage"] == "engine_step"}
    if decoder:
        builds = {r["variant"]: r for r in records if r["stage"] == "variant_build"}
        out += [
            "",
            "Decode step by batch and kernel variant: the fixed-shape step alone (input "
            "staging, graph replay, sampling on the device, the ids back; device time from "
            "CUDA events) and the whole engine step while that many requests decode (plus "
            "detokenising and events, pipelined with the next step), medians. `default` is the "
            "engine as configured; the others differ in decode attention kernel and "
            "compilation (build = compile + capture of that engine).",
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
        for name, build in builds.items():
            error = (
                f"; compile failed: {build['compile_error']}" if build.get("compile_error") else ""
            )
            out.append(
                f"\nVariant `{name}`: built in {_s(build['seconds'])} (warm-up "
                f"{_s(build['warmup_s'])}), compiled buckets {build['compiled_buckets']}{error}."
            )
    checks = [r for r in records if r["stage"] == "check"]
    if checks:
        out += [
            "",
            "Agreement with the model's own forward, standard request (relative error of "
            "the logits or embeddings; bf16 rounding is ~1e-2, a wrong mask or position ~1):",
            "",
            "| engine | vision embeddings | prefill logits | first decode step logits "
            "| prefill argmax agrees |",
            "|---|---:|---:|---:|---|",
        ]
        for r in checks:
            vision = r.get("vision")
            out.append(
                f"| {r['variant']} | {'-' if vision is None else f'{vision:.2e}'} "
                f"| {r['prefill_logits']:.2e} | {r['decode_logits']:.2e} "
                f"| {r['prefill_argmax_agrees']} |"
            )
    pixels = _find(records, "pixel_check")
    if pixels:
        verdict = (
            "bit for bit"
            if pixels["pixels_equal_to_cpu"]
            else f"NOT equal (max difference {pixels['pixels_max_difference']:.3g})"
        )
        out += [
            "",
            f"Image pipeline on the device against the CPU (resized JPEGs "
            f"{', '.join(f'{w}x{h}' for w, h in pixels['sizes'])}): {verdict}.",
        ]
    kernel = _find(records, "kernels")
    if kernel:
        out += [
            "",
            f"Prefill parts of the standard request ({kernel['prompt_tokens']} tokens), ours "
            "against the model's own modules, device synchronised medians:",
            "",
            "| part | engine | model's own | ratio |",
            "|---|---:|---:|---:|",
        ]
        for label, ours, theirs in (
            ("vision tower, the standard image", "vision_ours_s", "vision_model_s"),
            (
                f"vision tower, {kernel['large_size']} px image",
                "large_vision_ours_s",
                "large_vision_model_s",
            ),
            ("text prefill + lm_head", "prefill_ours_s", "prefill_model_s"),
        ):
            ratio = kernel[theirs] / kernel[ours] if kernel.get(ours) else None
            out.append(
                f"| {label} | {_ms(kernel.get(ours))} | {_ms(kernel.get(theirs))} "
                f"| {'-' if ratio is None else f'x{ratio:.1f}'} |"
            )
        for key in sorted(k for k in kernel if k.startswith("packed_") and k.endswith("_s")):
            n = key.split("_")[1]
            out.append(
                f"\nPacked prefill of {n} such prompts in one forward: {_ms(kernel[key])} "
                f"({kernel[f'packed_{n}_tflops']:.0f} TFLOP/s in the projections and MLP)."
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
    for sustained in (r for r in records if r["stage"] == "sustained"):
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
            "Mixed load: inter-token latency of running streams while large requests arrive "
            "(prefill budget per step while streams decode; `off`: every prompt and vision "
            "pass in one piece):",
            "",
            "| large requests | prompt tokens | prefill budget | vision chunked | ITL before p50 "
            "| ITL p50 | ITL p99 | ITL max | large TTFT mean |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in mixed:
            what = f"{r['size']} px image" if r["kind"] == "image" else "long text"
            out.append(
                f"| {what} | {r['large_prompt']} | {r.get('budget', '?')} "
                f"| {r.get('chunk_vision', '?')} | {_ms(r['before_p50'])} | {_ms(r['p50'])} "
                f"| {_ms(r['p99'])} | {_ms(r['max'])} | {_ms(r['ttft_mean'])} |"
            )
    for startup in (r for r in records if r["stage"] == "startup"):
        out += [
            "",
            f"Start to ready, {startup.get('compile_cache', '?')} compile cache "
            f"({startup.get('max_batch_size', '?')} rows, {startup.get('max_seq_len', '?')} "
            f"tokens per KV slot, {startup.get('shapes', '?')} decode shapes, compiled buckets "
            f"{startup.get('compiled_buckets', '?')}): {_s(startup['start_to_ready_s'])} = "
            f"interpreter and imports {_s(startup['interpreter_and_imports_s'])} + load and KV "
            f"slots {_s(startup['load_s'])} + warm-up {_s(startup['warmup_s'])} (checkpoint "
            f"saved in {_s(startup.get('save_s'))} just before, so its weights were read from "
            "the page cache).",
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
        f"{build.get('shapes', '?')} decode shapes (CUDA graphs: {build.get('graphs', '?')}; "
        f"compiled buckets {build.get('compiled_buckets', '?')}; decode attention "
        f"{build.get('attention', '?')}), {build.get('slots', '?')} KV slots of "
        f"{build.get('max_seq_len', '?')} tokens, prefill budget "
        f"{build.get('prefill_budget', '?')} tokens per step.",
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
