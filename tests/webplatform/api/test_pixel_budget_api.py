"""A phone photo through ``/v1/chat/completions``: scaled to the model's pixel budget at
validation, answered, and charged for the image tokens of the scaled image; OpenAI's
``image_url.detail`` picks the budget (``webplatform/uploads/budget.py``)."""

from __future__ import annotations

import base64
import io
import math

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.factories import PlanFactory, TenantFactory
from webplatform.uploads.budget import PIXELS_PER_TOKEN

pytest_plugins = ["tests.webplatform.live_server"]  # the live_asgi_server fixture

TWENTY_MB = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def phone_photo() -> bytes:
    """A 4000 x 3000 JPEG (12 MP) with detail at every scale, like a photographed label."""
    image = Image.new("RGB", (4000, 3000), (236, 228, 210))
    draw = ImageDraw.Draw(image)
    for y in range(0, 3000, 24):
        for x in range(0, 4000, 200):
            draw.text((x + (y % 48), y), "BEST BEFORE 03/27", fill=(20 + x % 90, 40, 60 + y % 120))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    return out.getvalue()


@pytest.fixture
def http(live_asgi_server, settings) -> httpx.Client:  # type: ignore[no-untyped-def]
    tenant = TenantFactory(plan=PlanFactory(max_image_bytes=TWENTY_MB, tokens_per_day=10**7))
    with live_asgi_server.client_for(tenant, timeout=120) as client:
        yield client


def _ask(http: httpx.Client, photo: bytes, detail: str | None) -> httpx.Response:
    image_url: dict[str, str] = {
        "url": "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    }
    if detail is not None:
        image_url["detail"] = detail
    return http.post(
        "/v1/chat/completions",
        json={
            "model": "glm-4.6v-flash",
            "max_tokens": 4,
            "temperature": 0,
            "cache": False,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": image_url},
                        {"type": "text", "text": "When does this product expire?"},
                    ],
                }
            ],
        },
    )


def _rounded_up(tokens: int, aspect: float) -> int:
    """The most tiles an image of ``tokens`` tiles and this aspect may have once each side is
    rounded to whole tiles: one more row and one more column."""
    width = math.sqrt(tokens * aspect)
    return math.floor((width + 1) * (tokens / width + 1))


def test_a_12_megapixel_photo_is_answered_within_the_budget(http, phone_photo, settings):
    response = _ask(http, phone_photo, None)

    assert response.status_code == 200, response.text
    image_tokens = response.json()["usage"]["prompt_tokens_details"]["image_tokens"]
    # The whole photo would be ~15,300 tokens; the default budget is 1,600. The model's
    # processor rounds each side to whole 28 px tiles, which may add one row and column.
    budget_tokens = settings.IMAGE_PIXEL_BUDGET // PIXELS_PER_TOKEN
    assert 0.9 * budget_tokens < image_tokens <= _rounded_up(budget_tokens, 4 / 3)


def test_detail_picks_the_budget(http, phone_photo, settings):
    tokens = {}
    for detail in ("low", "auto"):
        response = _ask(http, phone_photo, detail)
        assert response.status_code == 200, response.text
        tokens[detail] = response.json()["usage"]["prompt_tokens_details"]["image_tokens"]

    assert tokens["low"] <= _rounded_up(settings.IMAGE_PIXEL_BUDGET_LOW // PIXELS_PER_TOKEN, 4 / 3)
    assert tokens["low"] < tokens["auto"]
    # The aspect ratio survives the downscale (4:3 in whole 28 px tiles, so within a tile).
    assert math.isclose(tokens["auto"] / tokens["low"], 1_254_400 / 200_704, rel_tol=0.25)
