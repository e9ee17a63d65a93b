"""Image pixels in two halves: decode on the CPU, resize + patchify + normalise on the device.

The GLM-4.1V/4.6V PIL image processor (``Glm46VImageProcessorPil``, ``Glm4vImageProcessorPil``)
does, per image (``preprocess`` -> ``process_image`` -> ``_preprocess``):

1. ``process_image``: RGB, as a channel-first uint8 array ``[C, H, W]``;
2. ``resize``: to the ``smart_resize`` size (multiples of ``patch_size * merge_size``), with
   Pillow's ``Image.resize`` on the uint8 image;
3. ``rescale``: ``float64(x) * rescale_factor``, cast to float32;
4. ``normalize``: ``(x - mean[c]) / std[c]`` in float32;
5. ``patchify``: float32 ``[grid_h * grid_w, C*T*P*P]``, each spatial patch repeated
   ``T = temporal_patch_size`` times; column ``j`` holds channel ``j // (T*P*P)``.

``PatchExtractor`` splits this where the image leaves the CPU. In the preprocessing threads
(``PatchExtractor.__call__``) only step 1 and the arithmetic of step 2 run: the decoded
image stays channels-last uint8 ``[H, W, C]`` as Pillow hands it over, the target size comes
from the processor module's own ``smart_resize``, and the resize coefficients of that size
pair are computed (cached). On the model's device (``PatchExtractor.model_pixels``) the
image is uploaded, resized by ``pillow_resize`` (a port of Pillow's separable resampling in
integer arithmetic, equal to ``Image.resize`` bit for bit), patchified by ``patchify`` (the
processor's layout) and normalised by ``PixelNormalizer``: steps 3-4 map each (channel, byte
value) to one float32 whatever the pixel's position, so they are one lookup in a ``[C, 256]``
table that the processor's own ``rescale`` and ``normalize`` filled. The result equals the
processor's ``pixel_values`` bit for bit on every device (tests/inference/test_pixels.py).

A processor this path does not reproduce (another class, a subclass, NEAREST or another
filter not ported, a Pillow whose pass order the probe does not recognise) gets no
extractor: the caller runs the whole processor on the CPU.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import numpy as np
import torch

from inference.engine.resample import pillow_resize, pillow_taps, resample_supported

logger = logging.getLogger(__name__)

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


def patchify(
    image: torch.Tensor, *, patch_size: int, merge_size: int, temporal_patch_size: int
) -> torch.Tensor:
    """``[H, W, C]`` -> ``[grid_h * grid_w, C*T*P*P]`` in ``image``'s dtype and device.

    The layout of ``Glm46VImageProcessorPil.patchify`` (rows in merge-window order, columns
    (C, T, P, P)) without its cast to float32, from a channels-last image. ``H`` and ``W``
    must be multiples of ``patch_size * merge_size``. Returns a new contiguous tensor (the
    final reshape of the temporal broadcast copies).
    """
    height, width, channels = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = image.reshape(
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
        channels,
    )
    # (gh, gw, mh, mw, C, ph, pw), as the processor orders them.
    patches = patches.permute(0, 3, 1, 4, 6, 2, 5).unsqueeze(5)
    patches = patches.expand(*patches.shape[:5], temporal_patch_size, *patches.shape[6:])
    return patches.reshape(
        grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size
    )


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


# ---------------------------------------------------------------------------- the split
def _resolved_resample(processor: Any) -> int | None:
    """The Pillow filter ``PilBackend.resize`` uses for ``processor.resample``, or None where
    the processor does not hand Pillow its own value (None, which its ``preprocess``
    refuses, or a torchvision mode it maps): left to the processor."""
    resample = processor.resample
    if isinstance(resample, int):  # PILImageResampling is an IntEnum
        return int(resample)
    return None


def _upload(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``pixels`` on ``device``; to CUDA from pinned memory without blocking the host."""
    if pixels.device == device:
        return pixels
    if device.type == "cuda" and pixels.device.type == "cpu":
        # Pinned in the preprocessing thread when CUDA was already in use (``_host_copy``);
        # otherwise pinned here, one host copy. The caching host allocator keeps the pinned
        # block until the copy is done, whatever happens to this tensor.
        source = pixels if pixels.is_pinned() else pixels.pin_memory()
        return source.to(device, non_blocking=True)
    return pixels.to(device)


def _host_copy(array: np.ndarray) -> torch.Tensor:
    """A contiguous tensor owning a copy of ``array``, pinned once this process uses CUDA.

    The copy is what the CUDA upload needs anyway (pinned memory for a non-blocking copy); on
    a CPU host it gives torch a writable buffer (``np.asarray`` of a Pillow image is a
    read-only view of its bytes, which torch warns about sharing) and channels-last rows
    where ``process_image`` gave channels first.
    """
    # is_initialized, not is_available: it never starts CUDA (fork-safe) and is true exactly
    # when the model runner has put something on a GPU in this process.
    pinned = torch.cuda.is_initialized()
    out = torch.empty(array.shape, dtype=torch.uint8, pin_memory=pinned)
    np.copyto(out.numpy(), array)
    return out


class PatchExtractor:
    """The processor's steps 1, 2 and 5 in uint8, split between the CPU and the device.

    ``__call__`` (preprocessing threads): PIL image -> decoded uint8 ``[H, W, C]`` and the
    grid the processor would give. ``model_pixels`` (the model's device): those two ->
    the processor's ``pixel_values``. Build it with ``for_processor``, which returns None for
    a processor this path does not reproduce (the caller then runs the full processor).
    Thread-safe: no state but caches of coefficients and tables.
    """

    def __init__(self, processor: Any, *, resample: int | None) -> None:
        self.processor = processor
        self.resample = resample
        self.normalizer = PixelNormalizer.from_image_processor(processor)
        self.patch_size = int(processor.patch_size)
        self.merge_size = int(processor.merge_size)
        self.temporal_patch_size = int(processor.temporal_patch_size)
        # The function the processor's own ``resize`` calls (each GLM module has its copy).
        self._smart_resize = sys.modules[type(processor).__module__].smart_resize

    @classmethod
    def for_processor(cls, processor: Any) -> PatchExtractor | None:
        if type(processor) not in _known_processor_types():
            return None
        resample = _resolved_resample(processor)
        if processor.do_resize:
            size = processor.size
            if not (size.shortest_edge and size.longest_edge):
                return None  # the processor raises its own error for this
            if resample is None or not resample_supported(resample):
                return None
        return cls(processor, resample=resample)

    def __call__(self, image: Any) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Decoded uint8 ``[H, W, C]`` of ``image`` (a PIL image, or the uint8 ``[H, W, 3]``
        pixels of ``prompt.decode_pixels``) and its grid ``(1, grid_h, grid_w)``.

        The pixels are those ``process_image`` gives (with the processor's own
        ``do_convert_rgb``), channels last and at the decoded size; the grid is the
        processor's, from the ``smart_resize`` size its ``resize`` would compute. Raises
        ValueError where the processor would fail (an aspect ratio over 200, no resize and
        sides that are not multiples of ``patch_size * merge_size``, not 3 channels).
        """
        array = self._rgb_array(image)
        height, width = int(array.shape[0]), int(array.shape[1])
        factor = self.patch_size * self.merge_size
        proc = self.processor
        if proc.do_resize:
            height, width = self._smart_resize(
                num_frames=self.temporal_patch_size,
                height=height,
                width=width,
                temporal_factor=self.temporal_patch_size,
                factor=factor,
                min_pixels=proc.size.shortest_edge,
                max_pixels=proc.size.longest_edge,
            )
        elif height % factor or width % factor:
            raise ValueError(f"{height}x{width} is not a multiple of {factor} and do_resize is off")
        if self.resample is not None:
            # The resize coefficients of each axis that changes, computed here (they are
            # cached by size pair) rather than on the engine thread, which only uploads them.
            for in_size, out_size in zip(array.shape[:2], (height, width), strict=True):
                if in_size != out_size:
                    pillow_taps(int(in_size), out_size, self.resample)
        return _host_copy(array), (1, height // self.patch_size, width // self.patch_size)

    def _rgb_array(self, image: Any) -> np.ndarray:
        """``process_image``'s pixels as ``[H, W, C]`` uint8, without its copies if possible."""
        proc = self.processor
        if isinstance(image, np.ndarray):
            # A validated image's pixels (``prompt.decode_pixels``): RGB already, what
            # ``process_image`` would give of it.
            array = image
        elif getattr(image, "mode", None) == "RGB" and image.info.get("transparency") is None:
            # What process_image would give: convert_to_rgb's ``convert("RGB")`` of an RGB
            # image without transparency is a copy of it, and np.array of it the same bytes.
            array = np.asarray(image)
        else:
            # Transparency (which convert_to_rgb composites onto white) or another mode: the
            # processor's own conversion, moved back to channels last (a view).
            array = np.moveaxis(
                proc.process_image(image, do_convert_rgb=proc.do_convert_rgb), 0, -1
            )
        if array.ndim != 3 or array.shape[2] != self.normalizer.channels:
            raise ValueError(f"expected {self.normalizer.channels} channels, got {array.shape}")
        if array.dtype != np.uint8:
            # Pillow resizes 8-bit RGB; anything else would not fit the table either.
            raise ValueError(f"expected uint8 pixels, got {array.dtype}")
        return array

    def patches(
        self,
        pixels: torch.Tensor,
        grid: tuple[int, int, int],
        *,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """uint8 ``[grid_h * grid_w, C*T*P*P]`` on ``device`` (None: where ``pixels`` are).

        ``pixels`` and ``grid`` are what ``__call__`` returned: the image is resized to
        ``grid * patch_size`` on the device when that is not its size, then patchified.
        """
        if device is not None:
            pixels = _upload(pixels, torch.device(device))
        _, grid_h, grid_w = (int(v) for v in grid)
        height, width = grid_h * self.patch_size, grid_w * self.patch_size
        if tuple(pixels.shape[:2]) != (height, width):
            if self.resample is None:  # only without do_resize, where sizes always match
                raise ValueError(f"{tuple(pixels.shape)} is not the grid's {height}x{width}")
            pixels = pillow_resize(pixels, height=height, width=width, resample=self.resample)
        return patchify(
            pixels,
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
        )

    def model_pixels(
        self,
        pixels: torch.Tensor,
        grid: tuple[int, int, int],
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The processor's ``pixel_values`` of the image, on ``device`` in ``dtype``."""
        return self.normalizer(self.patches(pixels, grid, device=device), dtype=dtype)
