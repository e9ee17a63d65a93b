"""The engine's fast paths against the model's own forward: agreement, then speed.

- ``fast_path_check``: for one standard request, the vision embeddings (``VisionPass``), the
  prefill's next-token logits (``prefill_packed``) and the first decode step's logits (the
  engine's decoder, whatever its attention kernel, compilation and graphs) against
  ``get_image_features`` and the model's own forward over the same tokens, as relative
  errors ``|ours - theirs| / |theirs|`` (bf16 on a GPU: ~1e-2 is rounding; a wrong mask,
  position or cache row gives ~1);
- ``prefill_timings``: the vision tower and the text prefill of the standard request, ours
  and the model's own, device synchronised, and packed prefills of several prompts at once
  with their arithmetic rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from inference.engine import Engine
from inference.engine.kv_cache import SlotKVCache
from inference.engine.runner import ModelRunner, PrefillJob
from inference.protocol import InferenceRequest

from .workloads import Images, image_blob, sync


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))


def _reference(runner: ModelRunner, request: InferenceRequest, images: Images) -> dict:
    """The model's own answers for ``request``: image features, last prompt logits, and the
    logits after feeding the greedy first token."""
    prompt = runner.prepare(request.messages, images, thinking=False)
    inputs = {k: v.to(runner.device) for k, v in prompt.model_inputs().items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(runner.dtype)
    model = runner.model
    with torch.inference_mode():
        features = None
        if "pixel_values" in inputs:
            out = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
            )
            features = torch.cat(list(out.pooler_output))
        logits = model(**inputs).logits[0, -1].float()
        first = int(logits.argmax())
        extended = dict(inputs)
        extended["input_ids"] = torch.cat(
            [inputs["input_ids"], torch.tensor([[first]], device=runner.device)], dim=1
        )
        extended["attention_mask"] = torch.ones_like(extended["input_ids"])
        extended["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(inputs["mm_token_type_ids"][:, :1])],
            dim=1,
        )
        second = model(**extended).logits[0, -1].float()
    return {"features": features, "logits": logits, "first": first, "second": second}


def fast_path_check(
    engine: Engine, request: InferenceRequest, images: Images, reference: dict | None = None
) -> tuple[dict[str, Any], dict]:
    """Relative errors of ``engine``'s vision, prefill and first decode step for ``request``
    (an idle engine; slot 0 is written). Returns them and the reference, for reuse."""
    if engine.has_unfinished():
        raise RuntimeError("fast_path_check needs an idle engine")
    runner = engine.runner
    reference = reference or _reference(runner, request, images)
    processed = runner.process_images(request.messages, images, scope=request.tenant_id)
    prompt = runner.build_prompt(request.messages, processed, thinking=False)
    [encoded] = runner.encode_images([prompt], None)
    job = runner.begin_prefill(prompt, encoded)
    logits = runner.prefill_chunk(engine.cache, job, 0, job.length)
    assert logits is not None
    decoded = engine.decoder.decode([reference["first"]], [job.length], [job.rope_delta])[0]
    result = {
        "prefill_logits": _relative_error(logits, reference["logits"]),
        "decode_logits": _relative_error(decoded, reference["second"]),
        "prefill_argmax_agrees": int(logits.argmax()) == reference["first"],
    }
    if reference["features"] is not None:
        result["vision"] = _relative_error(torch.cat(encoded.embeddings), reference["features"])
    return result, reference


def pixel_check(runner: ModelRunner, sizes: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    """Whether the image pipeline gives the same pixel values on the model's device as on
    the CPU (decode there, resize/patchify/normalise here), for JPEG images of ``sizes``
    (width, height) that need resizing; and the largest difference if not."""
    import io

    import numpy as np
    from PIL import Image

    from .workloads import make_request

    worst = 0.0
    for index, (width, height) in enumerate(sizes):
        rng = np.random.default_rng(index)
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images = {f"p{index}": buffer.getvalue()}
        request = make_request("p", "x", image=(f"p{index}", width), max_tokens=1)
        [image] = runner.process_images(request.messages, images, scope="check")
        here = image.model_pixels(device=runner.device, dtype=torch.float32).cpu()
        cpu = image.model_pixels(device=torch.device("cpu"), dtype=torch.float32)
        worst = max(worst, float((here - cpu).abs().max()))
    return {"pixels_equal_to_cpu": worst == 0.0, "pixels_max_difference": worst}


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prefill_timings(
    runner: ModelRunner,
    request: InferenceRequest,
    images: Images,
    *,
    large_size: int,
    packed: tuple[int, ...] = (4, 8),
    repeats: int = 5,
) -> dict[str, Any]:
    """Seconds (medians) of the vision tower and the text prefill of ``request``, ours and
    the model's own; of a ``large_size`` px image's vision pass, ours and theirs; and of
    packed prefills of ``packed`` copies of the prompt, with their TFLOP/s."""
    device = runner.device
    model = runner.model
    processed = runner.process_images(request.messages, images, scope=request.tenant_id)
    prompt = runner.build_prompt(request.messages, processed, thinking=False)
    inputs = prompt.model_inputs()
    pixels = inputs["pixel_values"].to(device, runner.dtype)
    grid = inputs["image_grid_thw"].to(device)
    out: dict[str, Any] = {"prompt_tokens": prompt.length}
    with torch.inference_mode():
        out["vision_ours_s"] = _median_time(
            lambda: runner.encode_images([prompt], None), device, repeats
        )
        out["vision_model_s"] = _median_time(
            lambda: model.model.get_image_features(pixels, grid), device, repeats
        )
        [encoded] = runner.encode_images([prompt], None)
        job = runner.begin_prefill(prompt, encoded)
        cache = SlotKVCache(
            num_layers=runner.num_layers,
            num_slots=max(packed),
            kv_heads=runner.kv_heads,
            max_len=prompt.length,
            head_dim=runner.head_dim,
            dtype=runner.dtype,
            device=device,
        )

        def fresh(job: PrefillJob) -> PrefillJob:
            return PrefillJob(job.embeds, job.positions, job.rope_delta, job.token_ids)

        out["prefill_ours_s"] = _median_time(
            lambda: runner.prefill_chunk(cache, fresh(job), 0, job.length), device, repeats
        )
        embeds = job.embeds[None]
        positions = job.positions[:, None]
        text = model.model.language_model

        def theirs() -> torch.Tensor:
            hidden = text(inputs_embeds=embeds, position_ids=positions, use_cache=False)
            return model.lm_head(hidden.last_hidden_state[:, -1])

        out["prefill_model_s"] = _median_time(theirs, device, repeats)
        flops = runner.text_weights.flops_per_token() * prompt.length
        for n in packed:
            seconds = _median_time(
                lambda n=n: runner.prefill(
                    cache, [(fresh(job), slot, job.length) for slot in range(n)]
                ),
                device,
                max(2, repeats // 2),
            )
            out[f"packed_{n}_s"] = seconds
            out[f"packed_{n}_tflops"] = n * flops / seconds / 1e12
        big = {"big": image_blob(large_size, 999)}
        from .workloads import make_request

        large = make_request("big", "Describe.", image=("big", large_size), max_tokens=1)
        big_prompt = runner.build_prompt(
            large.messages, runner.process_images(large.messages, big, scope="t"), thinking=False
        )
        big_inputs = big_prompt.model_inputs()
        big_pixels = big_inputs["pixel_values"].to(device, runner.dtype)
        big_grid = big_inputs["image_grid_thw"].to(device)
        out["large_size"] = large_size
        out["large_vision_ours_s"] = _median_time(
            lambda: runner.encode_images([big_prompt], None), device, 2
        )
        out["large_vision_model_s"] = _median_time(
            lambda: model.model.get_image_features(big_pixels, big_grid), device, 2
        )
    return out
