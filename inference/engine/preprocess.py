"""Image decoding and preprocessing off the engine's step loop.

Decoding a PNG and resizing/normalising it costs milliseconds to tens of milliseconds per
image on the CPU; done inside ``step()`` it would stall every running stream. ``Preprocessor``
runs ``ModelRunner.process_images`` in a small thread pool (Pillow and NumPy release the
GIL for most of that work); the engine submits a request a few places before its turn and
picks the result up when it admits it.

``threads=0`` runs the work inline at submission (deterministic; the engine then submits
only what it admits at once). A request without images never goes to the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from inference.engine.prompt import ProcessedImage
from inference.protocol import ImagePart, InferenceRequest

ProcessFn = Callable[..., list[ProcessedImage]]


class Preprocessor:
    """Submits image preprocessing; results come back as futures. Thread-safe."""

    def __init__(self, process: ProcessFn, threads: int) -> None:
        self._process = process
        self._pool = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="engine-images")
            if threads > 0
            else None
        )

    @property
    def inline(self) -> bool:
        return self._pool is None

    def submit(
        self, request: InferenceRequest, images: Mapping[str, bytes]
    ) -> Future[list[ProcessedImage]]:
        """Start preprocessing ``request``'s images; the future raises PromptError on a bad one."""
        has_images = any(
            isinstance(part, ImagePart) for message in request.messages for part in message.content
        )
        if self._pool is not None and has_images:
            return self._pool.submit(self._run, request, images)
        future: Future[list[ProcessedImage]] = Future()
        try:
            future.set_result(self._run(request, images))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _run(self, request: InferenceRequest, images: Mapping[str, bytes]) -> list[ProcessedImage]:
        return self._process(request.messages, images, scope=request.tenant_id)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
