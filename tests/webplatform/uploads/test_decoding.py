"""Data URIs, bare base64 and URL classification; size refused before base64 decoding."""

from __future__ import annotations

import base64
import time

import pytest

from tenants.errors import ApplicationError
from webplatform.uploads import decoding
from webplatform.uploads.decoding import InlineImage, RemoteImage, image_source_parse

PAYLOAD = bytes(range(256)) * 4
B64 = base64.b64encode(PAYLOAD).decode()


def parse(source, max_bytes: int = 10_000):
    return image_source_parse(source=source, max_bytes=max_bytes, param="img")


def refused(source, max_bytes: int = 10_000) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        parse(source, max_bytes)
    assert caught.value.param == "img"
    return caught.value


@pytest.mark.parametrize(
    "source",
    [
        f"data:image/png;base64,{B64}",
        f"DATA:image/jpeg;base64,{B64}",
        f"data:;base64,{B64}",
        f"data:image/png;name=x.png;BASE64,{B64}",
        f"  data:image/png;base64,{B64}  ",
        B64,
        B64.rstrip("="),  # padding left out
        "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)),  # MIME line breaks
        PAYLOAD,
        bytearray(PAYLOAD),
    ],
)
def test_inline_forms(source) -> None:
    parsed = parse(source)
    assert isinstance(parsed, InlineImage)
    assert parsed.data == PAYLOAD


def test_declared_media_type_is_kept_for_information_only() -> None:
    assert parse(f"data:Image/PNG;base64,{B64}").declared_media_type == "image/png"
    assert parse(B64).declared_media_type is None


@pytest.mark.parametrize(
    "source",
    [
        "data:image/png;base64,@@@@",
        "data:image/png;base64,QUJD-_",  # URL-safe alphabet
        "data:image/png;base64,QQ==QUJD",  # data after padding
        "data:image/png;base64,QUJD====",  # padding the length does not need
        "data:image/png;base64,QUJD==",
        "data:image/png;base64,QUJDR",  # impossible length
        "data:image/png;base64,ü",
        "data:image/png,rawtext",  # not base64
        "data:image/png;charset=utf-8,abc",
        "data:image/png;base64" + "x" * 300,  # no comma in the header
        "data:image/png;base64,",
        "data:image/png;base64,  \n ",
        "",
        b"",
        "!!!!",
    ],
)
def test_invalid_image_data(source) -> None:
    error = refused(source)
    assert (error.code, error.status) == ("invalid_image_data", 400)


@pytest.mark.parametrize(
    "url", ["https://cdn.example.com/a.png", "http://cdn.example.com/a.png", "HTTPS://x.example/"]
)
def test_http_urls_go_to_the_url_policy(url: str) -> None:
    assert parse(url) == RemoteImage(url=url)


@pytest.mark.parametrize(
    "source", ["file:///etc/passwd", "ftp://x/a.png", "javascript:alert(1)", "gopher://x:70/"]
)
def test_other_schemes_are_refused(source: str) -> None:
    assert refused(source).code == "image_url_not_allowed"


def test_size_cap_on_bytes() -> None:
    assert parse(PAYLOAD, max_bytes=len(PAYLOAD)).data == PAYLOAD
    error = refused(PAYLOAD, max_bytes=len(PAYLOAD) - 1)
    assert error.code == "image_too_large"


def test_size_cap_on_base64_is_exact() -> None:
    assert parse(B64, max_bytes=len(PAYLOAD)).data == PAYLOAD
    assert refused(B64, max_bytes=len(PAYLOAD) - 1).code == "image_too_large"
    wrapped = "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76))
    assert parse(wrapped, max_bytes=len(PAYLOAD)).data == PAYLOAD


def test_huge_base64_is_refused_before_decoding(monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("base64 was decoded")

    monkeypatch.setattr(decoding.pybase64, "b64decode", no_decoding)
    huge = "data:image/png;base64," + "A" * (60 * 1024 * 1024)
    started = time.perf_counter()
    error = refused(huge, max_bytes=5 * 1024 * 1024)
    assert error.code == "image_too_large"
    assert time.perf_counter() - started < 0.5
    # Just over the limit, where whitespace could have explained the excess: still refused
    # without decoding.
    just_over = "A" * (4 * ((5 * 1024 * 1024) // 3 + 8))
    assert refused(just_over, max_bytes=5 * 1024 * 1024).code == "image_too_large"
