"""The record of a benchmark run: one JSON object per measurement, and its time budget.

``Recorder`` appends one JSON object per measurement to ``engine-bench.jsonl`` as soon as it
is taken (a run cut short by its time limit keeps what it measured), and keeps the time
budget: a stage whose estimate no longer fits is recorded as skipped, not started.
``load`` reads such a file back (``enginebench.report`` renders it).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
