"""Image preprocessing: the HF processor per image against decode here + the rest on the device.

Two paths over the same encoded images, in one process, in interleaved rounds (the order of
the two paths alternates every round) so that drift on a shared machine hits both alike:

- ``old``: ``decode_image`` + the checkpoint's image processor (resize with Pillow, float64/
  float32 rescale + normalise, float32 patchify) per image, all in the preprocessing thread,
  as ``PromptBuilder.process_images`` did before the split;
- ``new``, what ``PromptBuilder.process_images`` and the runner do now, in two parts:
  ``cpu``, what stays in the preprocessing threads (``decode_image``, the decoded uint8
  array and the processor's target size: ``PatchExtractor.__call__``), of which ``decode``
  is ``decode_image`` alone (what no path can remove) and ``rest`` the remainder; and
  ``device``, ``ProcessedImage.model_pixels`` (upload, resize where needed, patchify,
  normalise) on the CPU device in float32, as ``ModelRunner`` runs it on a CPU host (on a
  GPU host this part runs on the GPU and is not measured here). ``total`` = the two.

``key`` is the image cache key (a sha256 over the bytes, computed in the preprocessing
thread on both paths, unchanged), shown apart and left out of both paths.

Images: seeded uniform noise, 336 / 672 / 1344 px squares (multiples of 28: no resize) and
1000x750 (the processor resizes it to 1008x756), PNG and JPEG (quality 90). Noise is the
worst case for the decoders (PNG barely compresses it); the resize and the float work depend
only on the pixel count. Every round checks that both paths give the same pixel values, bit
for bit. Reported: per image, the median over rounds of each part and new/old ratios.

    .venv/bin/python benchmarks/preprocess.py              # tiny checkpoint, built in a temp dir
    .venv/bin/python benchmarks/preprocess.py --model DIR  # a checkpoint's own processor
"""

from __future__ import annotations

import argparse
import io
import os
import platform
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

# PPM: what the web side hands the worker since validation delivers raw pixels.
FORMATS = {"PNG": {}, "JPEG": {"quality": 90}, "PPM": {}}
PARTS = ("old", "decode", "rest", "cpu", "device", "total", "key")


def noise_image(width: int, height: int, fmt: str, *, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
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
    times: dict[str, list[float]] = {name: [] for name in PARTS}

    def old() -> torch.Tensor:
        return builder.image_processor(images=[decode_image(data)], return_tensors="pt")[
            "pixel_values"
        ]

    def new() -> tuple[torch.Tensor, tuple[int, int]]:
        decode_ms, decoded = timed(lambda: decode_image(data))
        rest_ms, (pixels, grid) = timed(lambda: extractor(decoded))
        image = ProcessedImage(
            key="",
            pixels=pixels,
            grid_thw=torch.tensor(grid),
            tokens=0,
            extractor=extractor,
        )
        device_ms, values = timed(lambda: image.model_pixels(device=cpu, dtype=torch.float32))
        times["decode"].append(decode_ms)
        times["rest"].append(rest_ms)
        times["cpu"].append(decode_ms + rest_ms)
        times["device"].append(device_ms)
        times["total"].append(decode_ms + rest_ms + device_ms)
        return values, (int(pixels.shape[0]), int(pixels.shape[1]))

    for round_ in range(rounds + 1):  # round 0 warms up (imports, caches) and is dropped
        for path in ("old", "new") if round_ % 2 else ("new", "old"):
            if path == "old":
                old_ms, reference = timed(old)
                times["old"].append(old_ms)
            else:
                values, decoded_size = new()
        if not torch.equal(values, reference):
            raise AssertionError("the two paths gave different pixel values")
        times["key"].append(timed(lambda: builder.image_key(data, scope="tenant"))[0])
        if round_ == 0:
            for series in times.values():
                series.clear()
    return times


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[336, 672, 1344])
    parser.add_argument(
        "--resized",
        nargs="+",
        default=["1000x750"],
        help="WIDTHxHEIGHT images that the processor resizes (default: 1000x750)",
    )
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

    import PIL

    processor = type(builder.image_processor).__name__
    print(
        f"processor={processor} split_path={builder.patch_extractor is not None} "
        f"rounds={args.rounds} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"pillow={PIL.__version__}"
    )
    print(f"machine: {machine()}")
    if builder.patch_extractor is None:
        print("this processor takes the full-processor fallback: nothing to compare")
        return
    sizes = [(size, size) for size in args.sizes]
    sizes += [tuple(int(v) for v in spec.split("x")) for spec in args.resized]
    print(
        "| image | resized to | old | decode | rest | new cpu | device | new total | key "
        "| cpu / old | total / old |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for width, height in sizes:
        for fmt in args.formats:
            data = noise_image(width, height, fmt, seed=width * 7 + height)
            times = measure(builder, data, args.rounds)
            med = {name: statistics.median(values) for name, values in times.items()}
            grid = builder.patch_extractor(decode_image(data))[1]
            patch = builder.patch_extractor.patch_size
            target = f"{grid[2] * patch}x{grid[1] * patch}"
            target = "-" if target == f"{width}x{height}" else target
            print(
                f"| {width}x{height} {fmt} | {target} | {med['old']:.2f} | {med['decode']:.2f} "
                f"| {med['rest']:.2f} | {med['cpu']:.2f} | {med['device']:.2f} "
                f"| {med['total']:.2f} | {med['key']:.2f} | {med['cpu'] / med['old']:.2f} "
                f"| {med['total'] / med['old']:.2f} |"
            )


if __name__ == "__main__":
    main()
