"""Upload validation cost per image type: this checkout's ``image_validate`` against an
earlier commit's, in one process, interleaved.

Images (seeded, photo-like: gradients plus noise, so JPEG sizes are a camera's): a 520 px
JPEG of ~200 KB (the API benchmark's), a 4000x3000 JPEG (a 12 MP phone photo, ~1.3 MB and
up), a 1920x1080 PNG screenshot (flat colours and text-like edges), a 672 px PNG of noise.
Both sides run with the virus scan off (its cost is the clamd round trip, the same on both
sides and not CPU in this process). Reported per image: the median of the rounds in
milliseconds, the blob handed on (bytes, pixels) and new/old.

    .venv/bin/python benchmarks/uploads.py                    # against the commit before the
    .venv/bin/python benchmarks/uploads.py --baseline cc2f418  #   budget and raw pixels
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webplatform.settings")
os.environ.setdefault("PLATFORM_TESTING", "1")


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * 3 + y) % 256], axis=-1)
    return (pixels + rng.integers(0, 18, pixels.shape)).clip(0, 255).astype(np.uint8)


def _screenshot(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    for _ in range(400):  # text-like strokes and boxes on a flat background
        x, y = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(20, 200)), int(rng.integers(2, 16))
        pixels[y : y + h, x : x + w] = rng.integers(0, 90, 3)
    return pixels


def _encode(pixels: np.ndarray, fmt: str, **params: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def images() -> dict[str, bytes]:
    return {
        "520 px JPEG": _encode(_photo(520, 520, 1), "JPEG", quality=97),
        "12 MP JPEG (4000x3000)": _encode(_photo(4000, 3000, 2), "JPEG", quality=90),
        "1920x1080 PNG screenshot": _encode(_screenshot(1920, 1080, 3), "PNG"),
        "672 px PNG noise": _encode(
            np.random.default_rng(4).integers(0, 256, (672, 672, 3), dtype=np.uint8), "PNG"
        ),
    }


def _baseline_validate(commit: str) -> Callable[..., Any]:
    """``image_validate`` of ``validation.py`` at ``commit``, loaded as its own module."""
    source = subprocess.run(
        ["git", "show", f"{commit}:webplatform/uploads/validation.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="uploads-baseline-"))
    path = folder / "baseline_validation.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_validation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module.image_validate  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="cc2f418", help="commit of the old validation")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings

    settings.CLAMD_URL = ""
    settings.CLAMD_REQUIRED = False
    from webplatform.uploads.budget import image_pixel_budget
    from webplatform.uploads.validation import image_validate

    old = _baseline_validate(args.baseline)
    budget = image_pixel_budget(model="glm-4.6v-flash")
    limits: dict[str, Any] = {"max_bytes": 64 * 2**20, "max_pixels": 40_000_000}
    paths: dict[str, Callable[[bytes], Any]] = {
        "old": lambda data: old(data=data, **limits),
        "new": lambda data: image_validate(data=data, pixel_budget=budget, **limits),
    }
    corpus = images()
    times: dict[tuple[str, str], list[float]] = {}
    blobs: dict[tuple[str, str], Any] = {}
    for round_ in range(args.rounds):
        order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
        for name, data in corpus.items():
            for path in order:
                started = time.perf_counter()
                result = paths[path](data)
                times.setdefault((name, path), []).append(time.perf_counter() - started)
                blobs[(name, path)] = result
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, load average {load}; pixel budget {budget:,}")
    print("| image | client bytes | old ms | old blob | new ms | new blob | new pixels | new/old |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, data in corpus.items():
        old_ms = statistics.median(times[(name, "old")]) * 1e3
        new_ms = statistics.median(times[(name, "new")]) * 1e3
        old_blob, new_blob = blobs[(name, "old")], blobs[(name, "new")]
        print(
            f"| {name} | {len(data) / 1024:.0f} KB | {old_ms:.1f} | "
            f"{len(old_blob.data) / 2**20:.2f} MB | {new_ms:.1f} | "
            f"{len(new_blob.data) / 2**20:.2f} MB | {new_blob.width}x{new_blob.height} | "
            f"{new_ms / old_ms:.2f} |"
        )


if __name__ == "__main__":
    main()
