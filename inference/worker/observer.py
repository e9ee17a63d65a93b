"""What the worker loop tells an observer: the hooks ``inference.worker.metrics`` feeds on.

``Worker`` calls these at the points where a request or the engine changes state; the base
class does nothing, so the loop (and the embedded mode, which runs the same loop in a
thread of the web process) needs no metrics library. ``WorkerMetrics`` implements them.

Every hook is called from the loop's thread and must not raise or block: it runs between
engine steps.
"""

from __future__ import annotations

from inference.engine.config import EngineStats
from inference.protocol import Event, InferenceRequest


class LoopObserver:
    """No-op hooks; override the ones you need."""

    def loading(self) -> None:
        """The process is loading (and warming) its model."""

    def ready(self) -> None:
        """The model is loaded and warmed and the loop joined the queue: it takes work."""

    def draining(self) -> None:
        """A stop was asked: no new work, the running batch finishes."""

    def stopped(self) -> None:
        """The loop returned."""

    def admitted(self, request: InferenceRequest) -> None:
        """``request`` was handed to the engine (called once per delivery admitted)."""

    def event(self, request: InferenceRequest, event: Event) -> None:
        """The engine produced ``event`` for an admitted request (before it is routed)."""

    def finished_early(self, request: InferenceRequest, event: Event) -> None:
        """``request`` ended without running to its end in the engine (cancelled or too old
        before it started, an image missing, given up after repeated deliveries, or failed
        at the drain bound); ``event`` is its terminal event. A request left pending for
        another worker to reclaim is not reported: it has not ended."""

    def step(self, seconds: float) -> None:
        """One ``engine.step()`` took ``seconds`` of wall time (raised or not)."""

    def engine_stats(self, stats: EngineStats, *, backlog: int) -> None:
        """The engine's statistics at a heartbeat; ``backlog``: taken, not yet admitted."""
