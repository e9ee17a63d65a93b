"""Waiting-request queue, fair across tenants.

Policy (what ``pop`` returns next):

1. Tenants take turns, round-robin in order of first arrival: a tenant with 50 queued
   requests gets one admission per turn, the same as a tenant with 2, so it cannot starve it.
2. Within one tenant, ``Priority`` first (HIGH before NORMAL before LOW), then arrival order.

Priority is deliberately *not* a key across tenants: it is set per request, and a tenant
sending only HIGH requests must not be able to starve the others. A tenant that empties its
queue leaves the rotation and rejoins at the back when it submits again.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from inference.protocol import Priority

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-tenant priority queues served round-robin. Not thread-safe."""

    def __init__(self) -> None:
        self._queues: dict[str, list[tuple[int, int, T]]] = {}
        self._turns: deque[str] = deque()  # tenants with queued items, next turn first
        self._arrival = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, tenant_id: str, item: T, priority: Priority = Priority.NORMAL) -> None:
        queue = self._queues.get(tenant_id)
        if queue is None:
            queue = self._queues[tenant_id] = []
            self._turns.append(tenant_id)
        heapq.heappush(queue, (int(priority), next(self._arrival), item))
        self._size += 1

    def pop(self) -> T | None:
        """The next item by the policy above, or None when empty."""
        if not self._turns:
            return None
        tenant_id = self._turns.popleft()
        queue = self._queues[tenant_id]
        _, _, item = heapq.heappop(queue)
        self._size -= 1
        if queue:
            self._turns.append(tenant_id)
        else:
            del self._queues[tenant_id]
        return item

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return every queued item matching ``predicate`` (O(queued))."""
        removed: list[T] = []
        for tenant_id in list(self._queues):
            queue = self._queues[tenant_id]
            keep = [entry for entry in queue if not predicate(entry[2])]
            if len(keep) == len(queue):
                continue
            removed.extend(entry[2] for entry in queue if predicate(entry[2]))
            self._size -= len(queue) - len(keep)
            if keep:
                heapq.heapify(keep)
                self._queues[tenant_id] = keep
            else:
                del self._queues[tenant_id]
                self._turns.remove(tenant_id)
        return removed
