"""The results: one measurement, its printed row, the best round of each, the summary.

Rows: mode, clients, requests, requests/s, p50 and p99 latency in ms, errors by kind.
The summary compares each HTTP mode with the engine alone at the same client count, then
shows the CPU each process spent per request (``apibench.cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cpu import GROUPS

HEADER = f"{'mode':<9} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9}"


@dataclass
class Result:
    """One measurement: a mode at a client count."""

    mode: str
    clients: int
    requests: int
    wall_s: float
    latencies_s: list[float]
    errors: dict[str, int]
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per request, by process group

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies_s)
        if not ordered:
            return float("nan")
        position = fraction * (len(ordered) - 1)
        low, high = int(position), min(int(position) + 1, len(ordered) - 1)
        value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
        return value * 1000


def print_result(r: Result) -> None:
    errors = ", ".join(f"{k} x{v}" for k, v in r.errors.items()) or "-"
    print(
        f"{r.mode:<9} {r.clients:>7} {r.requests:>8} {r.rps:>8.1f} "
        f"{r.percentile_ms(0.5):>9.1f} {r.percentile_ms(0.99):>9.1f}  {errors}",
        flush=True,
    )


def best(results: list[Result]) -> list[Result]:
    """Per mode and client count, the round with the most requests/s (the least disturbed
    by other load on the machine), in the order of the first round: by client count, then
    mode."""
    chosen: dict[tuple[str, int], Result] = {}
    for r in results:
        key = (r.mode, r.clients)
        if key not in chosen or r.rps > chosen[key].rps:
            chosen[key] = r
    return list(chosen.values())


def summary(results: list[Result]) -> None:
    by_key = {(r.mode, r.clients): r for r in results}
    print("\nplatform overhead (HTTP mode / engine alone, same clients):")
    print(f"{'mode':<9} {'clients':>7} {'p50 x':>7} {'p99 x':>7} {'rps x':>7} {'+p50 ms':>8}")
    for r in results:
        floor = by_key.get(("engine", r.clients))
        if r.mode == "engine" or floor is None or not r.latencies_s:
            continue
        print(
            f"{r.mode:<9} {r.clients:>7} "
            f"{r.percentile_ms(0.5) / floor.percentile_ms(0.5):>7.2f} "
            f"{r.percentile_ms(0.99) / floor.percentile_ms(0.99):>7.2f} "
            f"{floor.rps / r.rps:>7.2f} "
            f"{r.percentile_ms(0.5) - floor.percentile_ms(0.5):>8.1f}"
        )
    print("(p50 x, p99 x: latency ratios; rps x: engine requests/s over HTTP requests/s)")
    cpu_table(results)


def cpu_table(results: list[Result]) -> None:
    """CPU ms per request by process (``apibench.cpu``): nothing when none was measured."""
    if not any(r.cpu_ms for r in results):
        return
    shown = [g for g in GROUPS if any(g in r.cpu_ms for r in results)]
    print("\nCPU ms per request, by process (the same rounds):")
    print(f"{'mode':<9} {'clients':>7} " + " ".join(f"{g:>8}" for g in shown) + f" {'total':>8}")
    for r in results:
        cells = " ".join(f"{r.cpu_ms.get(g, 0.0):>8.1f}" for g in shown)
        print(f"{r.mode:<9} {r.clients:>7} {cells} {sum(r.cpu_ms.values()):>8.1f}")
    print(
        "(client: the load client, and in the engine mode the engine; redis, clamd, postgres:"
        " the machine's, shared)"
    )
