"""The pixel budget: large images are scaled down at validation, to the documented size,
with the documented filter, and nothing but their pixels reaches the worker."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tenants.errors import ApplicationError
from tests.webplatform.uploads import corpus
from webplatform.uploads.budget import PIXELS_PER_TOKEN, PROCESSOR_MAX_PIXELS, image_pixel_budget
from webplatform.uploads.validation import budget_fit, image_validate

MAX_BYTES = 20 * corpus.MIB
MAX_PIXELS = 40_000_000


def _photo(width: int, height: int, fmt: str, **params: object) -> bytes:
    """Smooth gradients with some noise: compresses like a photo, detail at every scale."""
    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    pixels = (pixels + rng.integers(0, 24, pixels.shape)).clip(0, 255).astype(np.uint8)
    return corpus.encode(Image.fromarray(pixels), fmt, **params)


def _pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB"))


def test_budget_fit_keeps_the_aspect_ratio_and_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(1, 9000, 2))
        budget = int(rng.integers(1, 3_000_000))
        fitted = budget_fit((width, height), budget)
        if width * height <= budget:
            assert fitted is None
            continue
        assert fitted is not None
        fitted_w, fitted_h = fitted
        assert 1 <= fitted_w <= width and 1 <= fitted_h <= height
        assert fitted_w * fitted_h <= budget
        # The aspect ratio within rounding: each side within 2 px (or 0.5%) of the exact one.
        exact = (budget / (width * height)) ** 0.5
        for fitted_side, side in ((fitted_w, width), (fitted_h, height)):
            error = abs(fitted_side - side * exact)
            assert error <= max(2, 0.005 * side * exact) or fitted_side == 1
        # And close to the budget, not far under it (the shorter side is 1 px at worst).
        assert (fitted_w + 2) * (fitted_h + 2) > budget or min(fitted) <= 2
    assert budget_fit((4000, 3000), 1_254_400) == (1293, 970)
    assert budget_fit((4000, 3000), None) is None


def test_a_png_over_the_budget_becomes_exactly_the_documented_resize():
    original = _photo(1600, 1200, "PNG")
    result = image_validate(
        data=original, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, pixel_budget=500_000
    )
    assert (result.original_width, result.original_height) == (1600, 1200)
    assert (result.width, result.height) == budget_fit((1600, 1200), 500_000) == (816, 612)
    assert result.downscaled
    expected = Image.open(io.BytesIO(original)).convert("RGB")
    expected = expected.resize((816, 612), Image.Resampling.LANCZOS, reducing_gap=3.0)
    np.testing.assert_array_equal(_pixels(result.data), np.asarray(expected))


def test_a_large_jpeg_is_decoded_at_reduced_scale_then_resized():
    original = _photo(4000, 3000, "JPEG", quality=90)
    budget = 1_254_400
    result = image_validate(
        data=original, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, pixel_budget=budget
    )
    assert (result.width, result.height) == (1293, 970)
    expected = Image.open(io.BytesIO(original))
    expected.draft("RGB", (1293, 970))
    assert expected.size == (2000, 1500)  # DCT scaling did half the work in the decoder
    expected = expected.convert("RGB").resize(
        (1293, 970), Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    np.testing.assert_array_equal(_pixels(result.data), np.asarray(expected))
    # Raw pixels: the blob is bounded by the budget, whatever the client sent.
    assert len(result.data) <= 3 * budget + 32


def test_an_image_within_the_budget_keeps_every_pixel():
    original = _photo(640, 480, "PNG")
    result = image_validate(
        data=original, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, pixel_budget=1_254_400
    )
    assert (result.width, result.height) == (640, 480) and not result.downscaled
    np.testing.assert_array_equal(_pixels(result.data), _pixels(original))


def test_a_trailing_payload_never_reaches_the_worker():
    carrier = corpus.jpeg_followed_by_eicar()  # scanning is off in these tests
    result = image_validate(data=carrier, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert corpus.eicar() not in result.data
    header = b"P6\n%d %d\n255\n" % (result.width, result.height)
    assert result.data.startswith(header)
    assert len(result.data) == len(header) + 3 * result.width * result.height


def test_the_budget_follows_detail_and_the_model_spec(settings):
    settings.INFERENCE_MODELS = {
        "plain": {"path": "x"},
        "tuned": {
            "path": "y",
            "image_pixel_budget": 400_000,
            "image_pixel_budget_low": 50_000,
            "image_pixel_budget_high": 3_000_000,
        },
        "short": {"path": "z", "max_seq_len": 4096},
    }
    assert image_pixel_budget(model="plain") == settings.IMAGE_PIXEL_BUDGET == 1_254_400
    assert image_pixel_budget(model="plain", detail="low") == 200_704
    assert image_pixel_budget(model="tuned") == 400_000
    assert image_pixel_budget(model="tuned", detail="low") == 50_000
    assert image_pixel_budget(model="tuned", detail="high") == 3_000_000
    # high without a spec value: what the context leaves for one image.
    short = (4096 - settings.IMAGE_BUDGET_TEXT_RESERVE) * PIXELS_PER_TOKEN
    assert image_pixel_budget(model="short", detail="high") == short
    assert image_pixel_budget(model="plain", detail="high") <= PROCESSOR_MAX_PIXELS
    with pytest.raises(ApplicationError) as caught:
        image_pixel_budget(model="plain", detail="ultra")
    assert (caught.value.code, caught.value.param) == ("invalid_request", "detail")
