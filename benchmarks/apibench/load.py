"""The load client: closed-loop workers, one measurement, and the interleaved rounds.

Closed loop: each of ``clients`` workers sends its next request when its last one is
answered. Rounds interleave client counts and modes, so that load from outside (a shared
machine) hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from . import cpu
from .report import HEADER, Result, print_result
from .targets import Target

WARM_UP_REQUESTS = 4


async def closed_loop(
    clients: int,
    inputs: Iterator[Any],
    total: int,
    call: Callable[[Any], Awaitable[str | None]],
) -> tuple[float, list[float], dict[str, int]]:
    """``clients`` workers share ``total`` calls, each on the next of ``inputs``; returns
    the wall time, the latencies of the successful calls and the errors by kind."""
    remaining = total
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            item = next(inputs)
            started = time.perf_counter()
            error = await call(item)
            if error is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors[error] = errors.get(error, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - started, latencies, errors


async def measure(target: Target, clients: int, jpegs: Iterator[bytes], total: int) -> Result:
    """``total`` requests on the next images of ``jpegs``, prepared before the timing; with
    the CPU each process spent on them (``apibench.cpu``, read outside the timing)."""
    inputs = iter([target.prepare(next(jpegs)) for _ in range(total)])
    before = cpu.snapshot()
    wall, latencies, errors = await closed_loop(clients, inputs, total, target.call)
    used = cpu.ms_per_request(before, cpu.snapshot(), total)
    return Result(target.mode, clients, total, wall, latencies, errors, used)


def requests_for(clients: int, args: argparse.Namespace) -> int:
    """Requests of one level: the larger of the minimum and per-client count x clients."""
    return max(args.min_requests, clients * args.requests_per_client)


async def run_rounds(
    targets: list[Target], images: dict[str, list[bytes]], args: argparse.Namespace
) -> list[Result]:
    """Warm every target up, then ``args.rounds`` rounds of every client count on every
    target, printing each result as it comes. Each mode walks its own ``images[mode]``, so
    every request of a mode gets an image no request of that mode had before."""
    streams = {t.mode: iter(images[t.mode]) for t in targets}
    for target in targets:  # loads the model, opens connections, fills process caches
        await measure(target, 1, streams[target.mode], WARM_UP_REQUESTS)
    print(HEADER)
    results = []
    for _ in range(args.rounds):
        for clients in args.clients:
            for target in targets:
                total = requests_for(clients, args)
                result = await measure(target, clients, streams[target.mode], total)
                results.append(result)
                print_result(result)
    return results
