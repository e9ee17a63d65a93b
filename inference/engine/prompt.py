"""Turn protocol messages + image bytes into model inputs with the checkpoint's own processor.

The prompt text comes from the checkpoint's chat template (``enable_thinking`` passed
through); images are decoded with Pillow and preprocessed by the checkpoint's image
processor. When the checkpoint's full ``AutoProcessor`` loads (it needs torchvision for its
video processor) it does the image-token expansion; otherwise ``PromptBuilder`` does the same
expansion itself (each ``<|image|>`` becomes ``t*h*w / merge**2`` copies, and
``mm_token_type_ids`` marks them 1), exactly what ``Glm46VProcessor`` does for images.

The engine builds a prompt in two parts so that the slow part can leave its step loop:
``process_images`` (decode each image, its grid and token count, and its cache key;
thread-safe, run in a thread pool) and ``build_from_processed`` (template + tokenizer +
expansion, on the engine thread: fast tokenizers are not safe to share between threads).
Images are preprocessed one at a time, which gives the same tensors as one call for all of
them (the image processor treats each image alone; checked by the tests). For a processor
that ``pixels.PatchExtractor`` knows, ``process_images`` keeps the decoded uint8 image and
its resize, patchify and normalisation wait for the device (``ProcessedImage.model_pixels``);
for any other it runs the full processor. ``build`` does the whole prompt in one call with
the HF processor, as an independent reference and for ``model.generate``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.engine.pixels import PatchExtractor
from inference.protocol import ErrorCode, ImagePart, Message, TextPart

logger = logging.getLogger(__name__)


class PromptError(Exception):
    """A request-level problem found while building its inputs (becomes an ErrorEvent)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ProcessedImage:
    """One preprocessed image: what the vision tower takes, and its cache key.

    With an ``extractor``, ``pixels`` is the decoded image, uint8 ``[H, W, C]`` at its own
    size (pinned host memory once the process uses CUDA), and ``model_pixels`` resizes,
    patchifies and normalises it on the device it is given. Without one, ``pixels`` holds the
    processor's float32 pixel values already. Either way ``model_pixels`` equals the
    processor's ``pixel_values`` cast to the dtype asked for, and ``grid_thw`` its grid.
    Immutable; ``model_pixels`` may run on any thread.
    """

    key: str  # see PromptBuilder.image_key
    pixels: torch.Tensor  # uint8 [H, W, C] decoded (extractor) or float32 [patches, C*T*P*P]
    grid_thw: torch.Tensor  # [3] long
    tokens: int  # image tokens in the prompt: t*h*w / merge**2
    extractor: PatchExtractor | None = None

    @property
    def pixel_values(self) -> torch.Tensor:
        """The processor's pixel values, float32 on the CPU, ``[t*h*w patches, C*T*P*P]``.

        Computed on every access from a decoded image: a reference view for tests and tools;
        the runner calls ``model_pixels`` on its device.
        """
        return self.model_pixels()

    def model_pixels(
        self, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Normalised pixel values on ``device`` (None: where ``pixels`` are) in ``dtype``.

        A decoded image moves as uint8 (from pinned memory, without blocking, to CUDA) and is
        resized, patchified and normalised there; returns ``[t*h*w patches, C*T*P*P]``.
        """
        if self.extractor is None:
            pixels = self.pixels if device is None else self.pixels.to(device)
            return pixels.to(dtype)
        t, h, w = (int(v) for v in self.grid_thw.tolist())
        return self.extractor.model_pixels(self.pixels, (t, h, w), device=device, dtype=dtype)


@dataclass
class PreparedPrompt:
    """Model inputs for one request, batch dimension 1, on CPU until prefill moves them.

    From ``build``: ``pixel_values`` holds every image. From ``build_from_processed``:
    ``images`` holds them one by one (with cache keys) and ``pixel_values`` is None.
    """

    input_ids: torch.Tensor  # [1, L] long
    mm_token_type_ids: torch.Tensor  # [1, L] int, 1 on image tokens
    pixel_values: torch.Tensor | None  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [images, 3]
    image_tokens: int
    images: tuple[ProcessedImage, ...] = ()

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments ``model(...)``/``model.generate(...)`` take for this prompt."""
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": torch.ones_like(self.input_ids),
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        if self.pixel_values is not None and self.image_grid_thw is not None:
            inputs["pixel_values"] = self.pixel_values
            inputs["image_grid_thw"] = self.image_grid_thw
        elif self.images:
            inputs["pixel_values"] = torch.cat([image.model_pixels() for image in self.images])
            inputs["image_grid_thw"] = torch.stack([image.grid_thw for image in self.images])
        return inputs


# The binary PPM of a validated image, exactly as validation writes it
# (webplatform/uploads/validation.py, ``_ppm``).
_PPM_HEADER = re.compile(rb"P6\n([1-9][0-9]{0,5}) ([1-9][0-9]{0,5})\n255\n")


def decode_pixels(data: bytes) -> Any:
    """What the engine's own preprocessing (``pixels.PatchExtractor``) takes: for a validated
    image, a read-only uint8 ``[H, W, 3]`` view of the PPM's pixel bytes, nothing decoded
    or copied; anything else (PPMs written otherwise too) decoded by ``decode_image``.

    Pillow's PPM reader and ``np.asarray`` of its image copy the pixels three times in
    chunks: ~2.8 ms for a 520 px image and ~10.6 ms for a 1293 x 970 one (the default
    pixel budget) on the path to the first token, against ~0.01 ms here."""
    header = _PPM_HEADER.match(data)
    if header is not None:
        width, height = int(header[1]), int(header[2])
        if len(data) - header.end() == width * height * 3:
            pixels = np.frombuffer(data, dtype=np.uint8, offset=header.end())
            return pixels.reshape(height, width, 3)
    return decode_image(data)


def decode_image(data: bytes) -> Any:
    """Decode encoded image bytes into an RGB PIL image, or raise PromptError."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # Pillow raises many types for corrupt input
        # The decoder's own words stay in the log: the client learns what, not Pillow's why.
        logger.info("cannot decode image: %s", exc)
        raise PromptError(ErrorCode.INVALID_REQUEST, "cannot decode image") from exc


def to_chat_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Protocol messages as the list-of-parts dicts chat templates take."""
    out = []
    for message in messages:
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                parts.append({"type": "image"})
        out.append({"role": message.role, "content": parts})
    return out


class PromptBuilder:
    """Chat template + image processing for one checkpoint. Stateless between calls."""

    def __init__(self, tokenizer: Any, image_processor: Any, processor: Any | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor  # the full HF processor when it could be loaded
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        # None for a processor the uint8 path does not know: process_images runs it whole.
        self.patch_extractor = PatchExtractor.for_processor(image_processor)
        settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else {}
        # What makes two preprocessings of the same bytes differ: part of the cache key.
        self.settings_digest = hashlib.sha256(
            json.dumps(settings, sort_keys=True, default=str).encode()
        ).hexdigest()

    @classmethod
    def from_pretrained(cls, path: str, *, local_files_only: bool) -> PromptBuilder:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        # The Pillow image processor on every host, also where torchvision is installed (then
        # transformers would pick its torchvision twin): one pipeline everywhere, the one the
        # uint8 patch path (pixels.py) reproduces bit for bit, with its float work moved to
        # the model's device.
        image_processor = AutoImageProcessor.from_pretrained(
            path, local_files_only=local_files_only, backend="pil"
        )
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
            processor.image_processor = image_processor
            return cls(processor.tokenizer, image_processor, processor)
        except Exception as exc:  # ImportError without torchvision (its video processor)
            # The fallback needs only the tokenizer and image processor; if those are broken
            # too, their own loading below raises the clearer error.
            logger.info(
                "AutoProcessor unavailable (%s); assembling tokenizer + image processor", exc
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        if Path(path, "chat_template.jinja").is_file() and not tokenizer.chat_template:
            tokenizer.chat_template = Path(path, "chat_template.jinja").read_text()
        return cls(tokenizer, image_processor)

    def render(self, messages: Sequence[Message], *, thinking: bool) -> str:
        """The prompt text from the checkpoint's chat template (the processor's if loaded)."""
        renderer = self.processor if self.processor is not None else self.tokenizer
        rendered: str = renderer.apply_chat_template(
            to_chat_messages(messages),
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        return rendered

    def build(
        self, messages: Sequence[Message], images: Mapping[str, bytes], *, thinking: bool
    ) -> PreparedPrompt:
        """Render, decode images (in message order), tokenize. Raises PromptError."""
        pil_images = []
        for message in messages:
            for part in message.content:
                if isinstance(part, ImagePart):
                    data = images.get(part.image.sha256)
                    if data is None:
                        raise PromptError(
                            ErrorCode.IMAGE_UNAVAILABLE, f"image {part.image.sha256} unavailable"
                        )
                    pil_images.append(decode_image(data))
        text = self.render(messages, thinking=thinking)
        if self.processor is not None:
            out = self.processor(text=[text], images=pil_images or None, return_tensors="pt")
            return self._prepared(out)
        return self._build_without_processor(text, pil_images)

    def image_key(self, data: bytes, *, scope: str) -> str:
        """Cache key of an image: sha256 over ``scope`` (the tenant), the processor settings
        and the bytes. Never equal for different tenants, settings or bytes."""
        digest = hashlib.sha256()
        for part in (scope.encode(), self.settings_digest.encode(), data):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return digest.hexdigest()

    def process_images(
        self, messages: Sequence[Message], images: Mapping[str, bytes], *, scope: str
    ) -> list[ProcessedImage]:
        """Decode and preprocess every image of ``messages`` in order. Raises PromptError.

        Thread-safe (Pillow + the image processor, no tokenizer): the engine runs it in a
        thread pool, off its step loop. With ``self.patch_extractor`` set, each image is only
        decoded here (its resize, patchify and normalisation wait for
        ``ProcessedImage.model_pixels`` on the model's device); else the full processor runs.
        """
        out = []
        for message in messages:
            for part in message.content:
                if not isinstance(part, ImagePart):
                    continue
                data = images.get(part.image.sha256)
                if data is None:
                    raise PromptError(
                        ErrorCode.IMAGE_UNAVAILABLE, f"image {part.image.sha256} unavailable"
                    )
                out.append(self._process_image(data, scope=scope))
        return out

    def _process_image(self, data: bytes, *, scope: str) -> ProcessedImage:
        extractor = self.patch_extractor
        if extractor is not None:
            pixels, grid_thw = extractor(decode_pixels(data))
            grid = torch.tensor(grid_thw, dtype=torch.long)
        else:
            processed = self.image_processor(images=[decode_image(data)], return_tensors="pt")
            pixels = processed["pixel_values"]
            grid = processed["image_grid_thw"][0].to(torch.long)
        return ProcessedImage(
            key=self.image_key(data, scope=scope),
            pixels=pixels,
            grid_thw=grid,
            tokens=int(grid.prod()) // self.merge_size**2,
            extractor=extractor,
        )

    def build_from_processed(
        self, messages: Sequence[Message], images: Sequence[ProcessedImage], *, thinking: bool
    ) -> PreparedPrompt:
        """Template + tokens for images already processed by ``process_images``."""
        text = self.render(messages, thinking=thinking)
        ids = self._tokenize(text, [image.tokens for image in images])
        mm = (ids == self.image_token_id).to(torch.int)
        return PreparedPrompt(
            input_ids=ids,
            mm_token_type_ids=mm,
            pixel_values=None,
            image_grid_thw=torch.stack([i.grid_thw for i in images]) if images else None,
            image_tokens=int((mm == 1).sum()),
            images=tuple(images),
        )

    def _tokenize(self, text: str, counts: Sequence[int]) -> torch.Tensor:
        """Expand each image placeholder to its token count, then tokenize: ``[1, L]``."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(counts):
            raise PromptError(
                ErrorCode.INVALID_REQUEST,
                f"{len(pieces) - 1} image placeholders for {len(counts)} images",
            )
        text = pieces[0] + "".join(
            self.image_token * n + piece for n, piece in zip(counts, pieces[1:], strict=True)
        )
        # The template already wrote [gMASK]<sop>; add nothing.
        ids: torch.Tensor = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        return ids

    def _build_without_processor(self, text: str, pil_images: list[Any]) -> PreparedPrompt:
        pixel_values = grid = None
        counts: list[int] = []
        if pil_images:
            processed = self.image_processor(images=pil_images, return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
            counts = [int(g.prod()) // self.merge_size**2 for g in grid]
        ids = self._tokenize(text, counts)
        return self._prepared(
            {
                "input_ids": ids,
                "mm_token_type_ids": (ids == self.image_token_id).to(torch.int),
                "pixel_values": pixel_values,
                "image_grid_thw": grid,
            }
        )

    def _prepared(self, out: Mapping[str, Any]) -> PreparedPrompt:
        ids = out["input_ids"].to(torch.long)
        mm = out.get("mm_token_type_ids")
        mm = (ids == self.image_token_id).to(torch.int) if mm is None else mm.to(torch.int)
        return PreparedPrompt(
            input_ids=ids,
            mm_token_type_ids=mm,
            pixel_values=out.get("pixel_values"),
            image_grid_thw=out.get("image_grid_thw"),
            image_tokens=int((mm == 1).sum()),
        )
