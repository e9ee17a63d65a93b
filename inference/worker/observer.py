"""What the worker loop tells an observer: the hooks ``inference.worker.metrics`` feeds on.

``Worker`` calls these at the points where a request or the engine changes state; the base
class does nothing, so the loop (and the embedded mode, which runs the same loop in a
thread of the web process) needs no metrics library. ``WorkerMetrics`` implements them.

Every hook is called from the loop's thread and must not raise or block: it runs between
engine steps, so a hook that has real work to do should note what it needs and do it on a
thread of its own (``WorkerMetrics`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

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
        """``event`` ends an admitted request without coming from ``engine.step()``: the
        error each request of a failed step gets (before it is routed). The events of a
        step come with ``step``."""

    def finished_early(self, request: InferenceRequest, event: Event) -> None:
        """``request`` ended without running to its end in the engine (cancelled or too old
        before it started, an image missing, given up after repeated deliveries, or failed
        at the drain bound); ``event`` is its terminal event. A request left pending for
        another worker to reclaim is not reported: it has not ended."""

    def step(self, seconds: float, events: Sequence[tuple[str, Event]] = ()) -> None:
        """One ``engine.step()`` took ``seconds`` of wall time (raised or not) and returned
        ``events``, ``(request id, event)`` pairs in the engine's order, before the loop
        routes them. Called once per step, so an observer's cost does not grow with the
        batch; an id that is not (or no longer) admitted is late engine output the loop
        drops. The loop does not change ``events`` afterwards: it may be kept."""

    def engine_stats(self, stats: EngineStats, *, backlog: int) -> None:
        """The engine's statistics at a heartbeat; ``backlog``: taken, not yet admitted."""
