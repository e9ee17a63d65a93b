"""Validated images waiting in the web process for the requests that put them.

A transport that sends a request's images with the request itself (the Redis transport
with its enqueue, the upstream client in the request's body) is handed them first, one
``put`` per request that names them, and takes them when that request goes out: each
``take`` releases one hold, and an image is kept until every request that put it took it,
or ``max_age_s`` passed since its last put (a request abandoned between its validation and
its start never takes its images).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class _Held:
    data: bytes
    holders: int  # puts not yet taken
    put_at: float  # the last put


class HeldImages:
    """Images by (tenant, sha256), thread-safe."""

    def __init__(self, *, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], _Held] = {}

    def put(self, *, tenant_id: str, sha256: str, data: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            for key, old in list(self._items.items()):
                if now - old.put_at > self.max_age_s:
                    del self._items[key]
            held = self._items.get((tenant_id, sha256))
            if held is None:
                self._items[(tenant_id, sha256)] = _Held(data, 1, now)
            else:
                held.holders += 1
                held.put_at = now

    def take(self, *, tenant_id: str, sha256s: Iterable[str]) -> dict[str, bytes]:
        """The bytes of each image held (one hold released per occurrence in ``sha256s``);
        an image not held (stored by an earlier request) is left out."""
        found: dict[str, bytes] = {}
        with self._lock:
            for sha256 in sha256s:
                held = self._items.get((tenant_id, sha256))
                if held is None:
                    continue
                found[sha256] = held.data
                held.holders -= 1
                if held.holders <= 0:
                    del self._items[(tenant_id, sha256)]
        return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
