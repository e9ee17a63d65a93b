"""``resample.pillow_resize``: Pillow's ``Image.resize`` ported to integer arithmetic on
torch tensors (``inference/engine/resample.py``), equal to Pillow bit for bit on every device.

The CUDA tests run where a GPU is present (the device run of this project) and are skipped
elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import resample as resampling
from inference.engine.resample import RESAMPLE_FILTERS, pillow_resize, pillow_taps

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
FILTER_NAMES = {1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _random_pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _pillow(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    resized = Image.fromarray(array).resize((width, height), resample, reducing_gap=None)
    return np.asarray(resized)


def _size_pairs(seed: int, count: int) -> list[tuple[int, int, int, int]]:
    """(in_h, in_w, out_h, out_w): random sizes both ways, plus the shapes that matter:
    an unchanged axis, integer and non-integer factors, > 4x down, 1-pixel sides."""
    rng = np.random.default_rng(seed)
    pairs = [
        (1, 1, 1, 7),
        (1, 9, 5, 1),
        (7, 1, 1, 1),
        (40, 30, 40, 77),
        (40, 30, 13, 30),
        (64, 48, 32, 24),
        (20, 30, 60, 90),
        (301, 250, 17, 23),
        (500, 90, 11, 90),
        (33, 47, 34, 46),
        (93, 54, 14, 51),
        (68, 73, 38, 52),
    ]
    while len(pairs) < count:
        in_h, in_w = (int(v) for v in rng.integers(1, 120, 2))
        if rng.random() < 0.2:
            out_h, out_w = (int(v) for v in rng.integers(1, 24, 2))  # often > 4x down
        else:
            out_h, out_w = (int(v) for v in rng.integers(1, 160, 2))
        if rng.random() < 0.15:
            out_h = in_h
        elif rng.random() < 0.15:
            out_w = in_w
        pairs.append((in_h, in_w, out_h, out_w))
    return pairs


@pytest.mark.parametrize("resample", sorted(RESAMPLE_FILTERS), ids=FILTER_NAMES.get)
def test_resize_equals_pillow_bit_for_bit(resample):
    rng = np.random.default_rng(resample)
    for in_h, in_w, out_h, out_w in _size_pairs(seed=resample, count=150):
        array = _random_pixels(rng, in_h, in_w)
        resized = pillow_resize(
            torch.from_numpy(array), height=out_h, width=out_w, resample=resample
        )
        expected = _pillow(array, out_h, out_w, resample)
        assert resized.dtype == torch.uint8
        np.testing.assert_array_equal(
            resized.numpy(), expected, err_msg=f"{(in_h, in_w)} -> {(out_h, out_w)}"
        )


@pytest.mark.parametrize("block", [1, 7, 1000, 1 << 30])
def test_cpu_resize_blocks_do_not_change_the_result(monkeypatch, block):
    monkeypatch.setattr(resampling, "_CPU_RESAMPLE_BLOCK", block)
    rng = np.random.default_rng(block)
    for in_h, in_w, out_h, out_w in ((90, 70, 131, 33), (64, 200, 20, 230), (5, 3, 44, 2)):
        array = _random_pixels(rng, in_h, in_w)
        for resample in (int(Image.Resampling.BICUBIC), int(Image.Resampling.LANCZOS)):
            resized = pillow_resize(
                torch.from_numpy(array), height=out_h, width=out_w, resample=resample
            )
            np.testing.assert_array_equal(resized.numpy(), _pillow(array, out_h, out_w, resample))


def test_resize_of_extreme_content_stays_in_range():
    """Saturated edges make bicubic and Lanczos overshoot: the clip must match Pillow's."""
    array = np.zeros((37, 53, 3), dtype=np.uint8)
    array[:, ::2] = 255
    array[::3] = 255 - array[::3]
    for resample in sorted(RESAMPLE_FILTERS):
        for out_h, out_w in ((101, 29), (12, 160), (37, 7)):
            resized = pillow_resize(
                torch.from_numpy(array), height=out_h, width=out_w, resample=resample
            )
            np.testing.assert_array_equal(resized.numpy(), _pillow(array, out_h, out_w, resample))


def test_the_installed_pillow_pass_order_is_recognised():
    import PIL

    for resample in sorted(RESAMPLE_FILTERS):
        assert resampling.resample_supported(resample), (PIL.__version__, resample)


@pytest.mark.parametrize("resample", sorted(RESAMPLE_FILTERS), ids=FILTER_NAMES.get)
def test_int32_accumulation_has_headroom(resample):
    """Each output's weights sum to 1 << 22 (up to one rounding per tap), and no partial
    sum can leave int32 (Lanczos, the widest lobes, peaks near 1.29 * 255 << 22)."""
    for in_size, out_size in ((1, 9), (9, 1), (100, 7), (7, 100), (1000, 3), (33, 32), (4, 4000)):
        taps = pillow_taps(in_size, out_size, resample)
        sums = taps.weights.sum(dim=0)
        assert (sums - (1 << resampling.PRECISION_BITS)).abs().max() <= taps.weights.shape[0]
        positive = taps.weights.clamp(min=0).sum(dim=0).max().item()
        negative = taps.weights.clamp(max=0).sum(dim=0).min().item()
        assert 255 * positive + (1 << 21) < 2**31 and 255 * negative + (1 << 21) >= -(2**31)


def test_resize_refuses_what_it_cannot_reproduce():
    image = torch.zeros(4, 4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError):
        pillow_resize(image, height=2, width=2, resample=int(Image.Resampling.NEAREST))
    with pytest.raises(ValueError):
        pillow_resize(image.float(), height=2, width=2, resample=3)


# ---------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("resample", sorted(RESAMPLE_FILTERS), ids=FILTER_NAMES.get)
def test_resize_on_cuda_equals_pillow_bit_for_bit(resample):
    rng = np.random.default_rng(100 + resample)
    device = torch.device("cuda")
    for in_h, in_w, out_h, out_w in _size_pairs(seed=100 + resample, count=150):
        array = _random_pixels(rng, in_h, in_w)
        resized = pillow_resize(
            torch.from_numpy(array).to(device), height=out_h, width=out_w, resample=resample
        )
        assert resized.device.type == "cuda"
        np.testing.assert_array_equal(
            resized.cpu().numpy(),
            _pillow(array, out_h, out_w, resample),
            err_msg=f"{(in_h, in_w)} -> {(out_h, out_w)}",
        )


@needs_cuda
def test_large_resizes_on_cuda_equal_pillow():
    """Sizes as the engine sees them (photos scaled to the processor's sizes)."""
    rng = np.random.default_rng(7)
    device = torch.device("cuda")
    for (in_h, in_w), (out_h, out_w) in (
        ((750, 1000), (756, 1008)),
        ((3000, 4000), (812, 1092)),
        ((1000, 1344), (1008, 1344)),
        ((203, 97), (336, 168)),
    ):
        array = _random_pixels(rng, in_h, in_w)
        for resample in sorted(RESAMPLE_FILTERS):
            resized = pillow_resize(
                torch.from_numpy(array).to(device), height=out_h, width=out_w, resample=resample
            )
            np.testing.assert_array_equal(
                resized.cpu().numpy(), _pillow(array, out_h, out_w, resample)
            )
