"""FairQueue: round-robin across tenants, priority then arrival within a tenant."""

from __future__ import annotations

from inference.engine.scheduler import FairQueue
from inference.protocol import Priority


def _drain(queue):
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_round_robin_across_tenants_fifo_within():
    queue: FairQueue[str] = FairQueue()
    for i in range(4):
        queue.push("A", f"A{i}")
    queue.push("B", "B0")
    queue.push("C", "C0")
    queue.push("B", "B1")
    assert len(queue) == 7
    assert _drain(queue) == ["A0", "B0", "C0", "A1", "B1", "A2", "A3"]
    assert len(queue) == 0


def test_priority_orders_a_tenants_own_queue_only():
    queue: FairQueue[str] = FairQueue()
    queue.push("A", "A-low", Priority.LOW)
    queue.push("A", "A-normal")
    queue.push("B", "B-normal")
    queue.push("A", "A-high", Priority.HIGH)
    queue.push("A", "A-high2", Priority.HIGH)
    # HIGH jumps A's queue, but does not let A take B's turn.
    assert _drain(queue) == ["A-high", "B-normal", "A-high2", "A-normal", "A-low"]


def test_remove_keeps_rotation_consistent():
    queue: FairQueue[str] = FairQueue()
    for item in ("A0", "A1", "B0", "C0"):
        queue.push(item[0], item)
    assert queue.remove(lambda item: item in {"B0", "A0"}) == ["A0", "B0"]
    assert len(queue) == 2
    assert _drain(queue) == ["A1", "C0"]


def test_tenant_rejoins_at_the_back():
    queue: FairQueue[str] = FairQueue()
    queue.push("A", "A0")
    queue.push("B", "B0")
    assert queue.pop() == "A0"
    queue.push("A", "A1")  # A emptied and left; it comes back behind B
    queue.push("B", "B1")
    assert _drain(queue) == ["B0", "A1", "B1"]
