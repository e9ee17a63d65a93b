"""Image pixels in two halves: uint8 patches on the CPU, normalisation where the model runs.

The GLM-4.1V/4.6V PIL image processor (``Glm46VImageProcessorPil``, ``Glm4vImageProcessorPil``)
does, per image (``preprocess`` -> ``process_image`` -> ``_preprocess``):

1. ``process_image``: RGB, as a channel-first uint8 array ``[C, H, W]``;
2. ``resize``: to the ``smart_resize`` size (multiples of ``patch_size * merge_size``), with
   Pillow on the uint8 image;
3. ``rescale``: ``float64(x) * rescale_factor``, cast to float32;
4. ``normalize``: ``(x - mean[c]) / std[c]`` in float32;
5. ``patchify``: float32 ``[grid_h * grid_w, C*T*P*P]``, each spatial patch repeated
   ``T = temporal_patch_size`` times; column ``j`` holds channel ``j // (T*P*P)``.

Steps 3-4 map each (channel, byte value) to one float32, whatever the pixel's position, so
they commute with the patch layout. ``PatchExtractor`` does steps 1, 2 and 5 in uint8
(calling the processor's own ``process_image`` and ``resize``); ``PixelNormalizer`` does
3-4 afterwards, on whatever device the patches are on, as one lookup in a ``[C, 256]``
table that the processor's own ``rescale`` and ``normalize`` filled. The result equals the
processor's ``pixel_values`` bit for bit (tests/inference/test_pixels.py), and the float
work leaves the CPU preprocessing threads (what stays there: about half of the old time per
image, ``benchmarks/preprocess.py``).

The processor's ``patchify`` is not reused for step 5: it casts its input to float32 first,
which is the pass this module exists to avoid. ``patchify_uint8`` is the same
reshape/transpose/broadcast, checked against it by the tests.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

# Byte values a uint8 pixel can take: the normaliser's table has one entry per value.
_BYTE_VALUES = 256
# Patches per block when normalising on the CPU (512 x 1176 int64: a 4.8 MB index buffer).
_CPU_BLOCK_ROWS = 512
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _known_processor_types() -> tuple[type, ...]:
    """Image processor classes whose pipeline is steps 1-5 above (read from transformers).

    Exact types only: a subclass may override any step, and then only the full processor
    is known to be right.
    """
    from transformers import Glm4vImageProcessorPil, Glm46VImageProcessorPil

    return (Glm46VImageProcessorPil, Glm4vImageProcessorPil)


def patchify_uint8(
    image: np.ndarray, *, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[np.ndarray, int, int]:
    """``[C, H, W]`` -> ``([grid_h * grid_w, C*T*P*P], grid_h, grid_w)`` in ``image``'s dtype.

    The layout of ``Glm46VImageProcessorPil.patchify`` (rows in merge-window order, columns
    (C, T, P, P)), without its cast to float32. ``H`` and ``W`` must be multiples of
    ``patch_size * merge_size`` (``smart_resize`` guarantees it). Returns a new contiguous
    array (the final reshape of the temporal broadcast copies).
    """
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = image.reshape(
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # (gh, gw, mh, mw, C, ph, pw), as the processor orders them.
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None, :, :],
        (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]),
    )
    flat = patches.reshape(
        grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size
    )
    return flat, grid_h, grid_w


def lookup_numpy(table: np.ndarray, offsets: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """``table[offsets[j] + patches[i, j]]`` for uint8 ``patches``, in ``table``'s dtype.

    One thread, row blocks sharing one small index buffer: an index copy of a whole large
    image costs more (fresh pages) than the lookup, and NumPy never waits for a second
    thread, which torch's parallel CPU kernels do when the cores are shared (measured on a
    busy 2-core machine, 1344 px image: 60 to over 500 ms in torch with 2 threads, 18-27 ms
    here).
    """
    rows = patches.shape[0]
    out = np.empty(patches.shape, dtype=table.dtype)
    index = np.empty((min(_CPU_BLOCK_ROWS, rows), patches.shape[1]), dtype=np.intp)
    for start in range(0, rows, _CPU_BLOCK_ROWS):
        part = patches[start : start + _CPU_BLOCK_ROWS]
        count = part.shape[0]
        np.add(part, offsets, out=index[:count], dtype=np.intp)
        # "clip" skips the bounds check; every index is in range by construction.
        np.take(table, index[:count], out=out[start : start + count], mode="clip")
    return out


def lookup_torch(table: torch.Tensor, offsets: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """``table[offsets[j] + patches[i, j]]`` in one pass on the tensors' device."""
    index = patches.to(torch.int32) + offsets
    return table.index_select(0, index.reshape(-1)).view(patches.shape)


class PixelNormalizer:
    """Rescale + normalise uint8 patches ``[N, C*T*P*P]`` into the processor's float values.

    ``table[c, v]`` is the processor's float32 output for byte value ``v`` in channel ``c``
    (computed once, by the processor's own ``rescale``/``normalize`` with its own flags, so
    the same float64/float32 steps in the same order). Normalising is a lookup in it: exact
    on every device, no float arithmetic there. Thread-safe.
    """

    def __init__(self, table: torch.Tensor, *, columns_per_channel: int) -> None:
        if table.dim() != 2 or table.shape[1] != _BYTE_VALUES:
            raise ValueError(f"table must be [channels, {_BYTE_VALUES}], got {tuple(table.shape)}")
        self.table = table.to(torch.float32).contiguous()
        self.channels = int(table.shape[0])
        self.columns_per_channel = int(columns_per_channel)
        self.columns = self.channels * self.columns_per_channel
        # Column j reads row j // columns_per_channel of the flattened table.
        channel_of_column = torch.arange(self.columns) // self.columns_per_channel
        self.offsets = (channel_of_column * _BYTE_VALUES).to(torch.int32)
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_image_processor(cls, processor: Any, *, channels: int = 3) -> PixelNormalizer:
        """The normaliser of ``processor`` (one of ``_known_processor_types``) for RGB input."""
        ramp = np.broadcast_to(
            np.arange(_BYTE_VALUES, dtype=np.uint8), (channels, 1, _BYTE_VALUES)
        ).copy()  # a [C, 1, 256] uint8 "image": every byte value in every channel
        values: np.ndarray = ramp
        if processor.do_rescale:
            values = processor.rescale(values, processor.rescale_factor)
        if processor.do_normalize:
            values = processor.normalize(values, processor.image_mean, processor.image_std)
        # patchify's own cast (a no-op after rescale/normalize, which give float32).
        values = np.asarray(values, dtype=np.float32)
        table = torch.from_numpy(np.ascontiguousarray(values.reshape(channels, _BYTE_VALUES)))
        patch = int(processor.patch_size)
        return cls(table, columns_per_channel=int(processor.temporal_patch_size) * patch * patch)

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The flat table in ``dtype`` and the column offsets, on ``device`` (cached)."""
        key = (device, dtype)
        with self._lock:
            found = self._on_device.get(key)
            if found is None:
                # Casting the table to ``dtype`` rounds each entry as casting the looked-up
                # float32 output would: the same values as normalising, then ``.to(dtype)``.
                found = (
                    self.table.reshape(-1).to(device=device, dtype=dtype),
                    self.offsets.to(device),
                )
                self._on_device[key] = found
        return found

    def __call__(
        self, patches: torch.Tensor, *, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Normalised ``patches`` (uint8 ``[N, columns]``) in ``dtype``, on their own device."""
        if patches.dtype != torch.uint8 or patches.dim() != 2 or patches.shape[1] != self.columns:
            raise ValueError(
                f"expected uint8 [N, {self.columns}] patches, got {patches.dtype} "
                f"{tuple(patches.shape)}"
            )
        if patches.device.type != "cpu":
            table, offsets = self._tables(patches.device, dtype)
            return lookup_torch(table, offsets, patches)
        # NumPy has no bfloat16: look up in float32 and cast (the same values, see _tables).
        numpy_dtype = dtype if dtype in _NUMPY_FLOATS else torch.float32
        table, offsets = self._tables(patches.device, numpy_dtype)
        out = lookup_numpy(table.numpy(), offsets.numpy(), patches.contiguous().numpy())
        return torch.from_numpy(out).to(dtype)


class PatchExtractor:
    """Steps 1, 2 and 5 of the processor in uint8: PIL image -> uint8 patches and grid.

    Build it with ``for_processor``, which returns None for a processor this path does not
    know (the caller then runs the full processor). Stateless, thread-safe.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.normalizer = PixelNormalizer.from_image_processor(processor)

    @classmethod
    def for_processor(cls, processor: Any) -> PatchExtractor | None:
        if type(processor) not in _known_processor_types():
            return None
        return cls(processor)

    def __call__(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """uint8 ``[patches, C*T*P*P]`` and grid ``(1, grid_h, grid_w)`` of a PIL ``image``.

        The channel-first uint8 array handed to ``resize`` is the one ``preprocess`` hands it
        (``process_image`` with the processor's own ``do_convert_rgb``).
        """
        proc = self.processor
        pixels = proc.process_image(image, do_convert_rgb=proc.do_convert_rgb)
        if pixels.shape[0] != self.normalizer.channels:
            raise ValueError(f"expected {self.normalizer.channels} channels, got {pixels.shape}")
        if proc.do_resize:
            pixels = proc.resize(
                pixels,
                size=proc.size,
                resample=proc.resample,
                factor=proc.patch_size * proc.merge_size,
                temporal_factor=proc.temporal_patch_size,
            )
        if pixels.dtype != np.uint8:
            # Pillow gives uint8 back for uint8 input; anything else would not fit the table.
            raise ValueError(f"resize returned {pixels.dtype}, expected uint8")
        patches, grid_h, grid_w = patchify_uint8(
            pixels,
            patch_size=proc.patch_size,
            merge_size=proc.merge_size,
            temporal_patch_size=proc.temporal_patch_size,
        )
        return patches, (1, grid_h, grid_w)
