"""What the whole HTTP path costs on top of the engine: requests/s and p50/p99 latency.

One standard request, non-streamed: a ~200 KB noise JPEG (data URI; a different image in
every request, so neither the answer cache nor the engine's image-embedding cache answers)
+ a short question, greedy, ``max_tokens`` 8, answer cache off (``"cache": false``). Sent by
``--clients`` concurrent workers (closed loop: each sends its next request when its last
one is answered; ``httpx.AsyncClient`` for HTTP) to three setups, all started first, then
measured in ``--rounds`` rounds with modes and client counts interleaved, so that load from
outside (a shared machine) hits all alike; the summary keeps each figure's best round:

- ``engine``: the same request straight into the inference client in this process (the
  in-process transport, worker thread and engine of the embedded mode), no HTTP, no
  authentication, admission, validation or settlement: the floor;
- ``embedded``: ``uvicorn webplatform.asgi:application`` as a subprocess in the embedded
  mode (SQLite file in a temp dir, process-local cache and quotas, in-process inference);
- ``redis``: the production wiring: uvicorn subprocess on PostgreSQL (a scratch database
  created and dropped by this script) and Redis (cache, quotas, Redis Streams queue, all
  under unique key prefixes deleted afterwards), plus one
  ``python -m inference.worker`` subprocess.

Each HTTP request runs the real path: API-key authentication, quota admission, image
validation (decode, pixel cap, re-encode to PNG; ClamAV INSTREAM scan when ``--clamd-url``
or ``CLAMD_URL`` is given), queue, tiny model, response, usage record and quota settlement.

    CLAMD_URL=$(bash scripts/clamd-test.sh) .venv/bin/python benchmarks/api.py

Beside the latencies it prints the CPU each process spent per request in the same rounds
(``apibench/cpu.py``: this process, the web and worker processes it started, and the
machine's Redis, clamd and PostgreSQL): at one client the steps of a request run one after
another, so that table says which process the time over the floor is in.

``--image standard photo screenshot`` runs each image set in turn on the same servers: the
standard JPEG, a 12 MP phone photo of a label (4000 x 3000 JPEG, scaled to the model's pixel
budget at validation) and a 1920 x 1080 PNG screenshot. The ``engine`` mode hands the image
to the engine whole (no pixel budget): use it with the standard image.

Options: ``--clients 1 16 64``, ``--modes engine embedded redis``, ``--rounds``,
``--min-requests`` and ``--requests-per-client`` (a level sends the larger of the minimum
and per-client count times clients),
``--database-url`` (the PostgreSQL server for the scratch database), ``--redis-url``,
``--model-dir`` (reuse a tiny checkpoint; else one is built in the temp dir, ~15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from apibench.load import WARM_UP_REQUESTS, requests_for, run_rounds  # noqa: E402
from apibench.provision import provision_command  # noqa: E402
from apibench.report import HEADER, best, print_result, summary  # noqa: E402
from apibench.request import IMAGE_SETS, MAX_TOKENS, request_body  # noqa: E402
from apibench.setups import (  # noqa: E402
    BENCH_SETTINGS,
    build_tiny_model,
    clamd_url_of,
    embedded_target,
    redis_target,
)
from apibench.targets import EngineTarget, HttpTarget, Target  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    args.secret = secrets.token_urlsafe(32)
    args.prefix = f"bench-api-{uuid.uuid4().hex[:10]}"
    args.clamd_url = clamd_url_of(args.clamd_url, os.environ)
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "bench_settings.py").write_text(BENCH_SETTINGS)
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            model_dir = tmp / "tiny-glm4v"
            build_tiny_model(model_dir)
        per_round = sum(requests_for(c, args) for c in args.clients)
        # Every request of a mode gets an image no request of that mode had before, and
        # none of another mode's or an earlier run's (a salt per mode and run): clamd's
        # cache of clean verdicts never answers. The engine alone scans nothing: it shares
        # the first set.
        salt = secrets.randbits(32)
        count = WARM_UP_REQUESTS + args.rounds * per_round
        scanned = [mode for mode in args.modes if mode != "engine"] or ["engine"]
        image_sets: dict[str, dict[str, list[bytes]]] = {}
        for name in args.image:
            sets = {mode: IMAGE_SETS[name](count, salt=salt + i) for i, mode in enumerate(scanned)}
            image_sets[name] = {mode: sets.get(mode, sets[scanned[0]]) for mode in args.modes}
        for name, by_mode in image_sets.items():
            images = next(iter(by_mode.values()))
            body = request_body(images[0], args.detail)
            print(
                f"request ({name}): {len(images[0]) / 1000:.0f} KB image "
                f"({len(body) / 1000:.0f} KB body), a different image each time, "
                f"max_tokens {MAX_TOKENS}, greedy, cache off",
                flush=True,
            )
        print(
            f"ClamAV {'on (' + args.clamd_url + ')' if args.clamd_url else 'off'}; "
            f"max({args.min_requests}, {args.requests_per_client} x clients) requests per "
            f"level; {args.rounds} rounds, modes and levels interleaved",
            flush=True,
        )
        with contextlib.ExitStack() as stack:
            targets: list[Target] = []
            for mode in args.modes:
                if mode == "engine":
                    targets.append(EngineTarget(model_dir, args.torch_threads))
                elif mode == "embedded":
                    url, key = stack.enter_context(embedded_target(tmp, model_dir, args))
                    targets.append(HttpTarget(mode, url, key, args.detail))
                else:
                    url, key = stack.enter_context(redis_target(tmp, model_dir, args))
                    targets.append(HttpTarget(mode, url, key, args.detail))
            results = {}
            try:
                for name, by_mode in image_sets.items():
                    print(f"\n{name}:")
                    results[name] = await run_rounds(targets, by_mode, args)
            finally:
                for target in targets:
                    await target.aclose()
        for name, image_results in results.items():
            print(f"\n{name}: best of {args.rounds} rounds (by requests/s):")
            print(HEADER)
            chosen = best(image_results)
            for r in chosen:
                print_result(r)
            summary(chosen)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["engine", "embedded", "redis"],
        choices=["engine", "embedded", "redis"],
    )
    parser.add_argument(
        "--image",
        nargs="+",
        default=["standard"],
        choices=sorted(IMAGE_SETS),
        help="standard: ~200 KB noise JPEG (520 px); photo: 12 MP phone photo of a label "
        "(4000 x 3000 JPEG); screenshot: 1920 x 1080 PNG",
    )
    parser.add_argument(
        "--detail",
        choices=["auto", "low", "high"],
        default=None,
        help="image_url.detail of every request (default: not sent, i.e. auto); low scales "
        "every image set to the same ~256 image tokens, so the model's work is the same and "
        "what differs between the sets is the platform's",
    )
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--min-requests", type=int, default=16, help="per client count")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch (OpenMP) threads of every engine; more than the free cores makes OpenMP "
        "spin against the other processes and collapses all figures on a shared machine",
    )
    parser.add_argument(
        "--queue-per-slot",
        type=int,
        default=1000,
        help="MODEL_MAX_QUEUE_PER_SLOT of the servers (the platform default, 4, refuses "
        "part of 64 clients' requests with 503 model_overloaded)",
    )
    parser.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/test",
        help="PostgreSQL server for the scratch database (its name is replaced)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    parser.add_argument("--clamd-url", default="", help="default: $CLAMD_URL; none: no scan")
    parser.add_argument("--model-dir", default="", help="an existing tiny checkpoint")
    return parser.parse_args()


if __name__ == "__main__":
    if sys.argv[1:2] == ["provision"]:
        provision_command()
    else:
        asyncio.run(main(parse_args()))
