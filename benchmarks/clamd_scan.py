"""What clamd's verdict costs against the decode it runs beside, per image type.

Validation sends the client's bytes to clamd and decodes them meanwhile
(``webplatform.uploads.validation``); whichever takes longer is on the request's path
unless the verdict is read later (``webplatform.completions.validation.ScanVerdicts``).
This times, in one process and interleaved, for each image of ``benchmarks/uploads.py``:

- ``decode``: ``image_validate`` with the scan off (decode, orientation, downscale to the
  model's pixel budget, the PPM and its digest), the baseline;
- ``scan``: one INSTREAM scan of bytes clamd has not seen (the image with a few bytes of
  its own appended after the end: a fresh digest, the same decoding work; clamd caches
  verdicts of clean files by digest);
- ``rescan``: the same bytes scanned again (clamd's clean-file cache answers).

Reported per image: medians in milliseconds and scan/decode.

    CLAMD_URL=$(bash scripts/clamd-test.sh) .venv/bin/python benchmarks/clamd_scan.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webplatform.settings")
os.environ.setdefault("PLATFORM_TESTING", "1")

from benchmarks.uploads import images  # noqa: E402


def _clamd_version(url: str) -> str:
    try:
        return subprocess.run(
            ["clamd", "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"clamd at {url}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clamd-url", default=os.environ.get("CLAMD_URL", ""))
    args = parser.parse_args()
    if not args.clamd_url:
        parser.error("a clamd is needed: --clamd-url or CLAMD_URL (bash scripts/clamd-test.sh)")

    import django

    django.setup()
    from django.conf import settings

    settings.CLAMD_URL = ""
    settings.CLAMD_REQUIRED = False
    from webplatform.uploads.budget import image_pixel_budget
    from webplatform.uploads.clamd import ClamdClient, clamd_address_parse
    from webplatform.uploads.validation import image_validate

    clamd = ClamdClient(clamd_address_parse(args.clamd_url), timeout=30)
    budget = image_pixel_budget(model="glm-4.6v-flash")
    corpus = images()
    times: dict[tuple[str, str], list[float]] = {}

    def timed(name: str, kind: str, call: object) -> None:
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.setdefault((name, kind), []).append(time.perf_counter() - started)

    for _ in range(args.rounds):
        for name, data in corpus.items():
            fresh = data + uuid.uuid4().bytes  # trailing bytes: never seen, decodes alike
            timed(
                name,
                "decode",
                lambda d=data: image_validate(
                    data=d, max_bytes=64 * 2**20, max_pixels=40_000_000, pixel_budget=budget
                ),
            )
            timed(name, "scan", lambda d=fresh: clamd.instream(d))
            timed(name, "rescan", lambda d=fresh: clamd.instream(d))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, load average {load}; {_clamd_version(args.clamd_url)}")
    print("| image | client bytes | decode ms | scan ms | rescan ms | scan/decode |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, data in corpus.items():
        decode, scan, rescan = (
            statistics.median(times[(name, kind)]) * 1e3 for kind in ("decode", "scan", "rescan")
        )
        print(
            f"| {name} | {len(data) / 1024:.0f} KB | {decode:.1f} | {scan:.1f} | "
            f"{rescan:.1f} | {scan / decode:.2f} |"
        )


if __name__ == "__main__":
    main()
