"""Hostile and awkward uploads through the HTTP API (``/v1/chat/completions``), end to end.

Each bad upload gets its own 4xx code, never a 5xx, and leaves nothing behind: no
concurrency lease held, no tokens reserved (checked through ``/v1/usage`` afterwards).
Valid but unusual images are answered. EICAR needs the real clamd (``CLAMD_URL``).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

import httpx
import pytest

from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]  # the live_asgi_server fixture

TOKENS_PER_DAY = 500_000


@pytest.fixture
def real_clamd(settings) -> str:
    """The project's clamd (``scripts/clamd-test.sh``), scanning required. Never skipped."""
    url = os.environ.get("CLAMD_URL", "")
    if not url:
        pytest.fail("These tests need clamd: export CLAMD_URL=$(bash scripts/clamd-test.sh)")
    settings.CLAMD_URL = url
    settings.CLAMD_REQUIRED = True
    return url


@pytest.fixture
def http(live_asgi_server, real_clamd) -> httpx.Client:  # type: ignore[no-untyped-def]
    tenant = TenantFactory(plan=PlanFactory(tokens_per_day=TOKENS_PER_DAY, concurrent_requests=2))
    key = api_key_for(tenant).raw_key
    with httpx.Client(
        base_url=live_asgi_server.url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as client:
        yield client


def _ask(http: httpx.Client, *image_urls: str) -> httpx.Response:
    content: list[dict] = [{"type": "text", "text": "What is in this image?"}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 4},
    )


def _assert_nothing_held(http: httpx.Client) -> None:
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0
    assert limits["tokens"]["remaining"] == TOKENS_PER_DAY


def _uri(data: bytes, media_type: str = "image/png") -> str:
    return corpus.data_uri(data, media_type)


BAD_UPLOADS: dict[str, tuple[Callable[[], list[str]], str]] = {
    "truncated jpeg": (
        lambda: [_uri(corpus.truncated_jpeg(), "image/jpeg")],
        "image_decode_failed",
    ),
    "png bomb": (lambda: [_uri(corpus.png_bomb())], "image_too_many_pixels"),
    "svg": (lambda: [_uri(corpus.SVG, "image/svg+xml")], "unsupported_image_type"),
    "pdf renamed png": (lambda: [_uri(corpus.PDF)], "unsupported_image_type"),
    "html": (lambda: [_uri(corpus.HTML, "text/html")], "unsupported_image_type"),
    "eicar in a png": (lambda: [_uri(corpus.png_carrying_eicar())], "malware_detected"),
    "eicar after a jpeg": (
        lambda: [_uri(corpus.jpeg_followed_by_eicar(), "image/jpeg")],
        "malware_detected",
    ),
    "invalid base64": (lambda: ["data:image/png;base64,@@not*base64@@"], "invalid_image_data"),
    "6 MB image": (lambda: [_uri(corpus.noise_png(6 * corpus.MIB))], "image_too_large"),
}


def test_each_bad_upload_is_refused_with_its_code_and_leaks_nothing(http, subtests):
    # One server for the whole corpus (subtests report each case): the suite stays fast.
    for name, (make_urls, code) in BAD_UPLOADS.items():
        with subtests.test(upload=name):
            response = _ask(http, *make_urls())

            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == code
            assert error["type"] == "invalid_request_error"
            assert error["param"] == "messages[0].content[1].image_url"
            assert response.headers["x-request-id"]
            _assert_nothing_held(http)


def test_more_images_than_allowed_are_refused_before_any_is_decoded(http, settings):
    image = _uri(corpus.encode(corpus.solid(), "PNG"))
    settings.IMAGE_MAX_PER_REQUEST = limit = 2  # read per request

    response = _ask(http, *[image] * (limit + 1))

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "too_many_images"
    _assert_nothing_held(http)
    assert _ask(http, *[image] * limit).status_code == 200


def test_the_simple_form_refuses_a_bad_image_in_its_own_field(http):
    response = http.post(
        "/v1/chat/completions",
        json={"prompt": "What is this?", "image": base64.b64encode(corpus.SVG).decode()},
    )

    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "image",
        "code": "unsupported_image_type",
    }
    _assert_nothing_held(http)


ODD_IMAGES = {
    "cmyk jpeg": (corpus.cmyk_jpeg, "image/jpeg"),
    "16-bit png": (corpus.png_16bit, "image/png"),
    "palette png with transparency": (corpus.palette_png_with_transparency, "image/png"),
    "animated gif": (corpus.animated_gif, "image/gif"),
}


def test_each_valid_odd_image_is_answered(http, subtests):
    charged = 0
    for name, (make, media_type) in ODD_IMAGES.items():
        with subtests.test(image=name):
            response = _ask(http, _uri(make(), media_type))

            assert response.status_code == 200, response.text
            body = response.json()
            assert body["usage"]["prompt_tokens_details"]["image_tokens"] > 0
            charged += body["usage"]["total_tokens"]
            limits = http.get("/v1/usage").json()["rate_limits"]
            assert limits["concurrent_requests"]["in_flight"] == 0
            # Charged what the requests used, not their reservations.
            assert TOKENS_PER_DAY - limits["tokens"]["remaining"] == charged


def test_an_earlier_image_found_infected_wins_over_a_later_one_that_does_not_decode(http):
    # The first image decodes (its verdict comes later, from clamd), the second does not:
    # the error is still the first refusal in the client's order, the scanner's.
    response = _ask(
        http, _uri(corpus.png_carrying_eicar()), _uri(corpus.truncated_jpeg(), "image/jpeg")
    )

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (
        "malware_detected",
        "messages[0].content[1].image_url",
    )
    _assert_nothing_held(http)


def test_a_clean_image_before_an_undecodable_one_leaves_the_decode_error(http):
    response = _ask(
        http,
        _uri(corpus.encode(corpus.solid(), "PNG")),
        _uri(corpus.truncated_jpeg(), "image/jpeg"),
    )

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (
        "image_decode_failed",
        "messages[0].content[2].image_url",
    )
    _assert_nothing_held(http)
