"""Reading the text in an image with RapidOCR (PP-OCRv4 models on ONNX Runtime, CPU).

``rapidocr-onnxruntime`` ships its three ONNX models (detection, direction classifier,
recognition; about 16 MB) inside the wheel, so nothing is downloaded at run time. The
recogniser reads Chinese and English (Latin letters, digits, punctuation).

The model is loaded once per ``OcrReader``, on first use (or by ``load()``), never at import
time and never into a module-level global.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


@dataclass(frozen=True)
class OcrLine:
    """One line of text: boxes that share a row, joined left to right."""

    text: str
    score: float  # the lowest recognition confidence among the joined boxes, 0..1
    top: float
    left: float


@dataclass(frozen=True)
class _Box:
    text: str
    score: float
    top: float
    bottom: float
    left: float

    @property
    def middle(self) -> float:
        return (self.top + self.bottom) / 2

    @property
    def height(self) -> float:
        return self.bottom - self.top


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes to the BGR ``uint8`` array RapidOCR takes.

    Transparent pixels are laid on white first: dark text on a transparent background would
    otherwise become dark text on black.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


def group_lines(boxes: list[_Box]) -> list[OcrLine]:
    """Join boxes whose vertical middles lie within half a box height into one line."""
    rows: list[list[_Box]] = []
    for box in sorted(boxes, key=lambda b: b.middle):
        if rows:
            row = rows[-1]
            reference = row[0]
            if abs(box.middle - reference.middle) <= max(reference.height, box.height) / 2:
                row.append(box)
                continue
        rows.append([box])
    lines = []
    for row in rows:
        row.sort(key=lambda b: b.left)
        lines.append(
            OcrLine(
                text=" ".join(b.text for b in row),
                score=min(b.score for b in row),
                top=min(b.top for b in row),
                left=row[0].left,
            )
        )
    return lines


class OcrReader:
    """Text lines from image bytes. Thread-safe; the model loads once, lazily.

    ``threads`` caps ONNX Runtime's intra-op threads (``None``: its default, every core).
    Boxes recognised with a confidence below ``min_score`` are dropped.
    """

    def __init__(self, *, threads: int | None = None, min_score: float = 0.5) -> None:
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError("min_score must be between 0 and 1")
        self.threads = threads
        self.min_score = min_score
        self._engine: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def load(self) -> None:
        """Load the ONNX models now (a fraction of a second) instead of on the first read."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        if self._engine is not None:
            return
        from rapidocr_onnxruntime import RapidOCR

        kwargs: dict[str, Any] = {"text_score": self.min_score, "print_verbose": False}
        if self.threads is not None:
            kwargs["intra_op_num_threads"] = self.threads
            kwargs["inter_op_num_threads"] = 1
        self._engine = RapidOCR(**kwargs)

    def read(self, data: bytes) -> list[OcrLine]:
        """The text lines of one image, top to bottom. Raises ``ImageDecodeError``."""
        array = decode_image(data)
        with self._lock:
            self._load_locked()
            result, _elapsed = self._engine(array)
        if not result:
            return []
        boxes = []
        for points, text, score in result:
            text = str(text).strip()
            if not text:
                continue
            ys = [float(p[1]) for p in points]
            xs = [float(p[0]) for p in points]
            boxes.append(_Box(text, float(score), min(ys), max(ys), min(xs)))
        return group_lines(boxes)
