"""Pillow's ``Image.resize`` for 8-bit images, in integer arithmetic on torch tensors.

A port of Pillow 13.0.0's src/libImaging/Resample.c (8 bits per channel; the arithmetic
is Pillow 12's, only the order of the two passes changed, see ``_pillow_pass_order``),
checked against the installed Pillow by the tests and, at run time, by the probes of
``_pillow_pass_order``. The float64 coefficient arithmetic assumes Pillow was compiled
without FMA contraction (x86-64 wheels are); an aarch64 build could round differently,
which the probe and the tests would show.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Pillow's fixed point for 8-bit images: a weight is an int with 22 fraction bits, so that
# a 32-bit accumulator holds 8 bits of pixel value and 2 bits of headroom for filters whose
# lobes sum beyond 1 in absolute value.
PRECISION_BITS = 32 - 8 - 2
_ROUNDING_BIAS = 1 << (PRECISION_BITS - 1)
# int32 elements per block of output rows when resampling on the CPU (512 KB buffers).
_CPU_RESAMPLE_BLOCK = 1 << 17
_INT32_MAX = 2**31 - 1
_INT32_MIN = -(2**31)
_M_PI = math.pi  # C's M_PI, the same double


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Pillow's ``#define a -0.5``, every operation in the C order (each NumPy operation
    # rounds once, as C does without FMA contraction).
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# Pillow writes the Hamming constants as C floats (0.54f, 0.46f), widened to double.
_HAMMING_A = float(np.float32(0.54))
_HAMMING_B = float(np.float32(0.46))


def _hamming_scalar(x: float) -> float:
    if x < 0.0:
        x = -x
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * _M_PI
    return math.sin(x) / x * (_HAMMING_A + _HAMMING_B * math.cos(x))


def _sinc_scalar(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * _M_PI
    return math.sin(x) / x


def _lanczos_scalar(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc_scalar(x) * _sinc_scalar(x / 3)
    return 0.0


def _libm(scalar: Callable[[float], float]) -> Callable[[np.ndarray], np.ndarray]:
    """``scalar`` over an array, one Python float at a time: ``math.sin``/``math.cos`` are the
    C library's, which Pillow calls; NumPy's own vectorised sin/cos may round differently."""
    ufunc = np.frompyfunc(scalar, 1, 1)
    return lambda x: np.asarray(ufunc(x), dtype=np.float64)


@dataclass(frozen=True)
class _Filter:
    support: float  # half-width in input pixels at scale 1
    weight: Callable[[np.ndarray], np.ndarray]  # elementwise, float64, Pillow's arithmetic


# Keyed by Pillow's ``Image.Resampling`` values. NEAREST (0) takes another code path in Pillow
# (an affine transform), and Pillow 13's Magic Kernel Sharp filters (6, 7) are not ported:
# processors using them fall back to the full processor.
_FILTERS: dict[int, _Filter] = {
    1: _Filter(3.0, _libm(_lanczos_scalar)),  # LANCZOS
    2: _Filter(1.0, _bilinear),  # BILINEAR
    3: _Filter(2.0, _bicubic),  # BICUBIC
    4: _Filter(0.5, _box),  # BOX
    5: _Filter(1.0, _libm(_hamming_scalar)),  # HAMMING
}
RESAMPLE_FILTERS = frozenset(_FILTERS)


@dataclass(frozen=True)
class ResampleTaps:
    """Pillow's coefficients for one axis, ``in_size`` -> ``out_size`` pixels, tap-major.

    Output pixel ``o`` is ``sum_t weights[t, o] * input[index[t, o]]`` (int32, 22 fraction
    bits). Taps past the ones Pillow uses for ``o`` have weight 0 and an index clamped into
    the image, so every tap can be gathered.
    """

    index: torch.Tensor  # [taps, out_size] int64
    weights: torch.Tensor  # [taps, out_size] int32

    def to(self, device: torch.device) -> ResampleTaps:
        return ResampleTaps(self.index.to(device), self.weights.to(device))


@functools.lru_cache(maxsize=1024)
def pillow_taps(in_size: int, out_size: int, resample: int) -> ResampleTaps:
    """``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Pillow's Resample.c, box = the
    whole input (``in0 = 0``, ``in1 = in_size``).

    float64 throughout as Pillow's C doubles, vectorised over output pixels with each
    operation in the C order; ``in1 - in0`` is a C float difference there, exact for sizes
    below 2**24. Raises ValueError when a weight sum could overflow int32 (never for the
    ported filters: the check documents why int32 accumulation is exact).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    spec = _FILTERS[resample]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = spec.support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale  # + in0, which is 0.0
    # (int) in C truncates toward zero, as NumPy's cast does.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    inv_filterscale = 1.0 / filterscale
    kernel = np.zeros((out_size, ksize), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for x in range(ksize):
        used = x < xmax
        w = np.where(used, spec.weight(((x + xmin) - center + 0.5) * inv_filterscale), 0.0)
        kernel[:, x] = w
        total = total + w  # Pillow's ``ww += w`` in tap order; unused taps add 0.0
    np.divide(kernel, total[:, None], out=kernel, where=(total != 0.0)[:, None])
    scaled = kernel * (1 << PRECISION_BITS)
    fixed = np.where(kernel < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled))
    # The accumulator starts at the rounding bias; any partial sum of products lies between
    # bias + 255 * (negative weights) and bias + 255 * (positive weights).
    highest = _ROUNDING_BIAS + 255 * np.where(fixed > 0, fixed, 0).sum(axis=1).max()
    lowest = _ROUNDING_BIAS + 255 * np.where(fixed < 0, fixed, 0).sum(axis=1).min()
    if highest > _INT32_MAX or lowest < _INT32_MIN:
        raise ValueError(f"resample {resample} {in_size}->{out_size} overflows int32")
    taps = int(xmax.max())  # Pillow's ksize is an upper bound; trailing all-zero taps go
    index = np.minimum(xmin[None, :] + np.arange(taps)[:, None], in_size - 1)
    return ResampleTaps(
        index=torch.from_numpy(np.ascontiguousarray(index)),
        weights=torch.from_numpy(np.ascontiguousarray(fixed[:, :taps].T).astype(np.int32)),
    )


@functools.lru_cache(maxsize=256)
def _taps_on(in_size: int, out_size: int, resample: int, device: torch.device) -> ResampleTaps:
    """``pillow_taps`` copied to ``device`` once (kilobytes per size pair)."""
    return pillow_taps(in_size, out_size, resample).to(device)


def _resample_leading(image: torch.Tensor, taps: ResampleTaps) -> torch.Tensor:
    """One Pillow pass along dim 0 of uint8 ``[N, M, C]``: ``[out_size, M, C]`` uint8.

    Integer arithmetic as ``ImagingResample{Horizontal,Vertical}_8bpc``: int32 products
    summed from the rounding bias, then the arithmetic shift and the clip to 0..255 of its
    ``clip8``. int32 is exact, as in Pillow's C ``int``: ``pillow_taps`` checked that no
    partial sum, in any order of the taps, can leave int32. One tap at a time, gathering
    whole rows (a multiply-add per tap, no dense matrix): memory stays at the output's
    size. On the CPU, blocks of output rows keep the int32 buffers in cache across the taps
    (1000x750 -> 1008x756: 21 against 36 ms in one thread) and keep each operation small.
    """
    source = image.to(torch.int32)
    out_size = taps.index.shape[1]
    row = image.shape[1:]
    rows_per_block = out_size
    if image.device.type == "cpu":
        rows_per_block = max(1, _CPU_RESAMPLE_BLOCK // max(1, math.prod(row)))
    out = torch.empty((out_size, *row), dtype=torch.uint8, device=image.device)
    shape = (min(rows_per_block, out_size), *row)
    total = torch.empty(shape, dtype=torch.int32, device=image.device)
    gathered = torch.empty(shape, dtype=torch.int32, device=image.device)
    for start in range(0, out_size, rows_per_block):
        stop = min(start + rows_per_block, out_size)
        block, part = total[: stop - start], gathered[: stop - start]
        block.fill_(_ROUNDING_BIAS)
        for tap in range(taps.index.shape[0]):
            torch.index_select(source, 0, taps.index[tap, start:stop], out=part)
            block.addcmul_(part, taps.weights[tap, start:stop].view(-1, 1, 1))
        block.bitwise_right_shift_(PRECISION_BITS)  # arithmetic shift on int32: floor
        out[start:stop] = block.clamp_(0, 255)
    return out


def _vertical_first_never(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    return False


def _vertical_first_when_height_shrinks_most(
    in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> bool:
    # Pillow 13 (``ImagingResampleInner``): "If height is being scaled down more than twice
    # the amount the width is, run the vertical pass first" (amounts in pixels, C ints).
    shrink_h, shrink_w = in_hw[0] - out_hw[0], in_hw[1] - out_hw[1]
    return shrink_h > 0 and shrink_h > shrink_w * 2


PassOrder = Callable[[tuple[int, int], tuple[int, int]], bool]
# Pillow 13.0, then Pillow up to 12 (always horizontal, then vertical).
_PASS_ORDERS: tuple[PassOrder, ...] = (
    _vertical_first_when_height_shrinks_most,
    _vertical_first_never,
)
# (in_h, in_w, out_h, out_w): each axis up, down and unchanged, and cases the orders differ
# on (the height shrinking by more, and by less, than twice the width's pixels).
_PROBE_SIZES = (
    (40, 32, 17, 48),
    (93, 54, 14, 51),
    (68, 73, 38, 52),
    (31, 45, 64, 20),
    (7, 9, 30, 40),
    (5, 1, 9, 1),
    (12, 30, 12, 7),
)


def _resize_with(
    image: torch.Tensor, height: int, width: int, resample: int, vertical_first: PassOrder
) -> torch.Tensor:
    in_hw = (int(image.shape[0]), int(image.shape[1]))
    out = image
    for axis in (0, 1) if vertical_first(in_hw, (height, width)) else (1, 0):
        size = (height, width)[axis]
        if out.shape[axis] == size:
            continue  # Pillow skips a pass whose size does not change
        # Each pass resamples the leading dim: rows are contiguous gathers on every device.
        source = out if axis == 0 else out.transpose(0, 1).contiguous()
        taps = _taps_on(int(source.shape[0]), size, resample, source.device)
        out = _resample_leading(source, taps)
        if axis == 1:
            out = out.transpose(0, 1).contiguous()
    return out


@functools.cache
def _pillow_pass_order(resample: int) -> PassOrder | None:
    """The pass order of the installed Pillow, found by resizing probe images with it.

    Pillow 13 resizes vertically first where the height shrinks by more than twice the
    width's pixels, earlier releases always horizontally first, and the intermediate uint8
    rounding makes the two differ; a GPU host may have another Pillow than this one. None
    when no known order reproduces Pillow on the probes (then the port does not match this
    Pillow: no fast path). The probes also check each filter's coefficients.
    """
    from PIL import Image

    rng = np.random.default_rng(20240601)
    probes = []
    for in_h, in_w, out_h, out_w in _PROBE_SIZES:
        pixels = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        expected = Image.fromarray(pixels).resize((out_w, out_h), resample, reducing_gap=None)
        probes.append((torch.from_numpy(pixels), out_h, out_w, np.asarray(expected)))
    for order in _PASS_ORDERS:
        if all(
            np.array_equal(_resize_with(image, h, w, resample, order).numpy(), expected)
            for image, h, w, expected in probes
        ):
            return order
    logger.warning("Pillow %s resample %s is not reproduced", _pillow_version(), resample)
    return None


def _pillow_version() -> str:
    import PIL

    return str(PIL.__version__)


def pillow_resize(image: torch.Tensor, *, height: int, width: int, resample: int) -> torch.Tensor:
    """``Image.resize((width, height), resample, reducing_gap=None)`` of an 8-bit image.

    ``image`` is uint8 ``[H, W, C]`` on any device; the result is uint8 ``[height, width,
    C]`` on the same device, equal to Pillow's bit for bit (``image`` itself when the size
    does not change, as Pillow returns a copy). ``resample`` must be in
    ``RESAMPLE_FILTERS``; raises ValueError when this Pillow is not reproduced.
    """
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"expected uint8 [H, W, C], got {image.dtype} {tuple(image.shape)}")
    if resample not in _FILTERS:
        raise ValueError(f"resample {resample} is not ported (have {sorted(_FILTERS)})")
    order = _pillow_pass_order(resample)
    if order is None:
        raise ValueError(f"Pillow {_pillow_version()} resample {resample} is not reproduced")
    return _resize_with(image, height, width, resample, order)


# ---------------------------------------------------------------------------- patches


def resample_supported(resample: int) -> bool:
    """Whether ``pillow_resize`` reproduces the installed Pillow's ``resample`` filter."""
    return resample in _FILTERS and _pillow_pass_order(resample) is not None
