"""Memory of a long-lived serving process: the C allocator keeps freed memory for the next
request (``keep_freed_memory``), and what the load created is kept out of the cyclic garbage
collector's way (``freeze_loaded_objects``).

Used by every process that loads a real engine: the worker (``inference.worker.main``) and
the in-process client of the embedded mode (``inference.client.inprocess.load_engine``, also
the floor of ``benchmarks/api.py``), so that both run the engine alike; and by the web
process (``webplatform/asgi.py``), whose uploads allocate the same buffers every request,
with a smaller ceiling on what it keeps (``WEB_TRIM_THRESHOLD_BYTES``).
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Mapping

# glibc's mallopt parameters (malloc.h) and the values the worker sets (keep_freed_memory).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's own ceiling for its adaptive threshold
_TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024
# The web process: each upload allocates its body, the decoded bytes, the decoded image and
# the pixels handed on (a few MB for a 520 px image, ~30 MB for a 12 MP photo) on whichever
# of its threads validates it. glibc would give its threads up to 8 arenas per core the
# container sees (hundreds on a large node), each keeping up to the trim threshold free at
# its top. 4 arenas (the main one included) keeping at most 32 MB free at the top each
# bound that part of what it holds after a burst to ~128 MB; fragmentation inside the
# heaps is not bounded by either (docs/benchmarks.md, "Web process allocator"). Its Python
# holds the GIL anyway, so few arenas cost it no parallelism.
WEB_TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
WEB_ARENA_MAX = 4


def keep_freed_memory(
    environ: Mapping[str, str] | None = None,
    *,
    trim_threshold: int = _TRIM_THRESHOLD_BYTES,
    arena_max: int | None = None,
) -> bool:
    """Have glibc's malloc keep memory the engine frees for its next allocation.

    Every request allocates the same tensors again (a step's activations, the image's
    pixels, the blob read from Redis). With glibc's defaults the larger ones come from a
    fresh ``mmap`` and go back to the kernel when freed, and the main heap's top is trimmed
    from 128 KB free, so each request page-faults its working set in anew: about 2,400
    faults (9 MB zeroed by the kernel) per standard request on the tiny CPU model, 5 ms of
    a 48 ms request (``benchmarks/worker_hop.py``). Allocations up to 32 MB from the heap,
    and up to 128 MB free kept at its top, make them reuse warm pages. The trim threshold
    holds for each of malloc's arenas (glibc makes up to 8 per core for threads that
    allocate at once), so a process with many allocating threads (the embedded mode's web
    process) may keep up to 128 MB more per arena at its peak, not per process; a worker
    allocates from its engine's thread and its IO thread, and holds a model many times that.

    ``trim_threshold``: the free memory kept at the top of each arena; ``arena_max``: a cap
    on malloc's arenas, None for glibc's (the web process keeps less, in fewer arenas:
    ``WEB_TRIM_THRESHOLD_BYTES``, ``WEB_ARENA_MAX``). Left alone when the operator tuned malloc
    (any ``MALLOC_*`` variable or ``GLIBC_TUNABLES``) or the C library is not glibc. True when set.
    """
    env = os.environ if environ is None else environ
    # MALLOC_*_ (MALLOC_TRIM_THRESHOLD_...) and MALLOC_ARENA_MAX / MALLOC_ARENA_TEST alike.
    if "GLIBC_TUNABLES" in env or any(name.startswith("MALLOC_") for name in env):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc (macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl has a mallopt that does nothing and answers 0.
    return bool(
        (arena_max is None or mallopt(_M_ARENA_MAX, arena_max))
        and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def freeze_loaded_objects() -> int:
    """Collect, then move every object alive now out of the cyclic garbage collector's
    generations (``gc.freeze``); returns how many were frozen. Call it once a long-lived
    process has loaded what it keeps (an engine; the web process's Django app, whose
    ~160,000 objects took ~60 ms a full collection, ``webplatform/asgi.py``).

    After a model is loaded and warmed its process holds hundreds of thousands of objects
    that live as long as it does (torch, transformers, the model's modules): 360,000 with
    the tiny model, where one full collection then takes ~135 ms (``benchmarks/gc_pause.py``).
    Python runs one whenever enough new long-lived objects pile up, on whichever thread
    allocates, the engine's included: a pause of that length between two decode steps.
    Frozen, they are never traversed again (a full collection of what is left takes well
    under a millisecond), and never freed, which they would not be anyway.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
