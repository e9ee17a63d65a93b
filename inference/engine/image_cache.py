"""Image-embedding cache: the vision tower's output per image, reused across requests.

A chat about one image sends the same image with every new question; its vision pass (the
largest part of a prefill for a big image) is the same each time. Entries are keyed by
``image_key`` (see ``PromptBuilder.image_key``): a sha256 over the tenant, the image
processor's settings and the image bytes, so the same bytes under other preprocessing are
another entry, and one tenant never reuses another tenant's entry (cache keys are
tenant-scoped: a shared entry would let one tenant learn from the time to first token that
another sent the same image).

Bounded by bytes, least recently used first out. An entry larger than the whole budget is
not kept. Thread-safe (a lock around every access): preprocessing threads may look up
while the engine thread stores.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class ImageEmbeddingCache:
    """LRU map ``key -> [image_tokens, hidden]`` tensor (on the model's device)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0  # images served from the cache (no vision pass)
        self.misses = 0  # images that went through the vision tower

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        """The embedding for ``key`` (counted as a hit) or None (counted as a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def count_hit(self) -> None:
        """An image reused within one vision batch (encoded once for several requests)."""
        with self._lock:
            self.hits += 1

    def put(self, key: str, embedding: torch.Tensor) -> None:
        """Keep ``embedding`` (the caller must not modify it afterwards)."""
        size = embedding.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = embedding
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
