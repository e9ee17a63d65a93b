"""Image blobs: validated, re-encoded image bytes stored once under a tenant-scoped hash.

The web side stores an image before it submits the request that refers to it
(``InferenceClient.put_image``); the worker fetches it by ``(tenant_id, sha256)``. In Redis
the key is ``{prefix}:blob:{tenant_id}:{sha256}`` with a TTL; in the embedded mode it is a
``LocalBlobStore`` entry. Scoping by tenant means one tenant can never name another's image,
even when both uploaded the same bytes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

from inference.protocol import ImageRef


class BlobDigestMismatch(ValueError):
    """The bytes do not hash to the ``ImageRef.sha256`` they are stored under."""


class DigestedBytes(bytes):
    """Bytes that carry their SHA-256, computed from them when they were made: a store given
    them does not hash them again (``blob_check_digest``). Validation hands its pixels on as
    these, so a 0.8 MB image is hashed once on its way to the worker, not twice, the second
    time on the web process's event loop (docs/benchmarks.md, "Image digest once"). Making
    them copies the bytes (a ``bytes`` subclass cannot adopt another object's buffer).
    Pickle makes them again, digest included; msgspec does not encode them (nothing sends
    image bytes through it)."""

    _sha256: str

    def __new__(cls, data: bytes) -> DigestedBytes:
        self = super().__new__(cls, data)
        self._sha256 = hashlib.sha256(self).hexdigest()
        return self

    @property
    def sha256(self) -> str:
        return self._sha256


def blob_check_digest(*, data: bytes, ref: ImageRef) -> None:
    """Refuse to store bytes under a hash they do not have (it would poison the key)."""
    if isinstance(data, DigestedBytes):
        digest = data.sha256
    else:
        digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256.lower():
        raise BlobDigestMismatch(f"image bytes hash to {digest}, not to {ref.sha256}")


class LocalBlobStore:
    """A thread-safe, process-local blob store with a TTL per entry (embedded mode).

    Same semantics as the Redis keys: storing existing bytes only refreshes their TTL;
    expired entries are gone (dropped lazily on access and on each put).
    """

    def __init__(self, *, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[bytes, float]] = {}

    def put(self, *, tenant_id: str, sha256: str, data: bytes) -> None:
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            key = (tenant_id, sha256)
            existing = self._entries.get(key)
            self._entries[key] = (existing[0] if existing else data, now + self._ttl_s)

    def get_many(self, *, tenant_id: str, sha256s: Sequence[str]) -> dict[str, bytes]:
        now = self._clock()
        found: dict[str, bytes] = {}
        with self._lock:
            for sha in sha256s:
                entry = self._entries.get((tenant_id, sha))
                if entry is not None and entry[1] > now:
                    found[sha] = entry[0]
        return found

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired(self._clock())
            return len(self._entries)

    def _drop_expired(self, now: float) -> None:
        # Caller holds the lock. O(n) per put; fine for the embedded mode's handful of images.
        for key in [k for k, (_, exp) in self._entries.items() if exp <= now]:
            del self._entries[key]
