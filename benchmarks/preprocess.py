"""Image preprocessing: the HF processor per image against uint8 patches + normalisation.

Two paths over the same encoded images, in one process, in interleaved rounds (the order of
the two paths alternates every round) so that drift on a shared machine hits both alike:

- ``old``: what ``PromptBuilder.process_images`` did before: ``decode_image`` + the
  checkpoint's image processor (resize, float64/float32 rescale + normalise, float32
  patchify) per image;
- ``new``: what ``PromptBuilder.process_images`` does now: ``decode_image`` + the processor's
  own resize on uint8 + uint8 patchify (``cpu``, what stays in the preprocessing threads), then
  ``ProcessedImage.model_pixels`` on the CPU device in float32, as ``ModelRunner._vision``
  runs it there (``normalise``; on a GPU host this part runs on the GPU and is not measured
  here); ``total`` = the two together. ``decode`` (``decode_image`` alone, part of ``cpu``
  and of ``old``) is what neither path can remove.

Images: seeded uniform noise, square, 336 / 672 / 1344 px, PNG and JPEG (quality 90). Noise
is the worst case for the decoders (PNG barely compresses it); the resize and the float work
depend only on the pixel count. Every round checks once that both paths give the same
pixel values. The image cache key (a sha256 of the bytes, the same on both paths) is left
out of both. Reported: per image kind, the median over rounds of each part and new/old.

    .venv/bin/python benchmarks/preprocess.py              # tiny checkpoint, built in a temp dir
    .venv/bin/python benchmarks/preprocess.py --model DIR  # a checkpoint's own processor
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.engine.prompt import ProcessedImage, PromptBuilder, decode_image

FORMATS = {"PNG": {}, "JPEG": {"quality": 90}}


def noise_image(size: int, fmt: str, *, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **FORMATS[fmt])
    return buffer.getvalue()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def measure(builder: PromptBuilder, data: bytes, rounds: int) -> dict[str, list[float]]:
    """Per-round milliseconds of each path's parts for one encoded image."""
    extractor = builder.patch_extractor
    assert extractor is not None
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {
        name: [] for name in ("old", "decode", "cpu", "normalise", "total")
    }

    def old() -> torch.Tensor:
        return builder.image_processor(images=[decode_image(data)], return_tensors="pt")[
            "pixel_values"
        ]

    def new() -> torch.Tensor:
        decode_ms, decoded = timed(lambda: decode_image(data))
        patch_ms, (patches, grid) = timed(lambda: extractor(decoded))
        cpu_ms = decode_ms + patch_ms
        image = ProcessedImage(
            key="",
            pixel_values=torch.from_numpy(patches),
            grid_thw=torch.tensor(grid),
            tokens=0,
            normalizer=extractor.normalizer,
        )
        norm_ms, pixels = timed(lambda: image.model_pixels(device=cpu, dtype=torch.float32))
        times["decode"].append(decode_ms)
        times["cpu"].append(cpu_ms)
        times["normalise"].append(norm_ms)
        times["total"].append(cpu_ms + norm_ms)
        return pixels

    for round_ in range(rounds + 1):  # round 0 warms up (imports, allocator) and is dropped
        for path in ("old", "new") if round_ % 2 else ("new", "old"):
            if path == "old":
                old_ms, reference = timed(old)
                times["old"].append(old_ms)
            else:
                pixels = new()
        if not torch.equal(pixels, reference):
            raise AssertionError("the two paths gave different pixel values")
        if round_ == 0:
            for values in times.values():
                values.clear()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[336, 672, 1344])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = args.model
        else:
            from inference.tiny_model import build_tiny_model

            # Only its processor is used: an untrained model is enough.
            path = str(build_tiny_model(Path(tmp) / "tiny", train_steps=0))
        builder = PromptBuilder.from_pretrained(path, local_files_only=Path(path).is_dir())

    processor = type(builder.image_processor).__name__
    print(
        f"processor={processor} uint8_path={builder.patch_extractor is not None} "
        f"rounds={args.rounds} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    if builder.patch_extractor is None:
        print("this processor takes the full-processor fallback: nothing to compare")
        return
    header = (
        f"{'image':>11} {'old':>8} {'decode':>7} {'new cpu':>8} {'normalise':>9} {'new total':>9}"
    )
    print(header + f" {'cpu/old':>7} {'total/old':>9}   (median ms)")
    for size in args.sizes:
        for fmt in args.formats:
            data = noise_image(size, fmt, seed=size)
            times = measure(builder, data, args.rounds)
            med = {name: statistics.median(values) for name, values in times.items()}
            print(
                f"{size:>5} {fmt:<5} {med['old']:8.2f} {med['decode']:7.2f} {med['cpu']:8.2f} "
                f"{med['normalise']:9.2f} {med['total']:9.2f} "
                f"{med['cpu'] / med['old']:7.2f} {med['total'] / med['old']:9.2f}"
            )


if __name__ == "__main__":
    main()
