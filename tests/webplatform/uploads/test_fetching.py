"""Remote image URLs: allowlist, no redirects, byte cap, then the usual validation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tenants.errors import ApplicationError
from tests.webplatform.uploads import corpus
from webplatform.uploads.fetching import remote_image_allowed, remote_image_fetch
from webplatform.uploads.services import UploadLimits, upload_validate_image

JPEG = corpus.jpeg_with_metadata()
BIG = corpus.noise_png(300_000)


class _Handler(BaseHTTPRequestHandler):
    routes = {
        "/cat.jpg": (200, {"Content-Type": "image/jpeg"}, JPEG),
        "/big.png": (200, {"Content-Type": "image/png"}, BIG),
        "/page.html": (200, {"Content-Type": "image/png"}, corpus.HTML),
        "/gone.png": (404, {}, b"not found"),
        "/redirect.png": (302, {"Location": "http://169.254.169.254/latest/"}, b""),
    }

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if self.path != "/big.png":  # no Content-Length there: the cap must hold while reading
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture
def image_server(settings) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    settings.REMOTE_IMAGE_HOST_ALLOWLIST = [host]
    try:
        yield f"http://{host}"
    finally:
        server.shutdown()
        server.server_close()


def test_allowlisted_url_is_fetched_and_validated(image_server) -> None:
    image = upload_validate_image(source=f"{image_server}/cat.jpg", param="p")
    assert image.original_type == "image/jpeg"
    assert image.original_size == len(JPEG)


def test_fetched_bytes_get_the_same_checks(image_server) -> None:
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=f"{image_server}/page.html", param="p")
    assert caught.value.code == "unsupported_image_type"


def test_redirects_are_not_followed(image_server) -> None:
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=f"{image_server}/redirect.png", param="p")
    assert (caught.value.code, caught.value.status) == ("image_fetch_failed", 400)
    assert "redirect" in caught.value.message


def test_http_errors_are_fetch_failures(image_server) -> None:
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=f"{image_server}/gone.png")
    assert caught.value.code == "image_fetch_failed"


def test_byte_cap_holds_while_reading(image_server) -> None:
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(
            source=f"{image_server}/big.png", limits=UploadLimits(max_bytes=100_000)
        )
    assert caught.value.code == "image_too_large"


def test_unreachable_allowlisted_host(settings) -> None:
    settings.REMOTE_IMAGE_HOST_ALLOWLIST = ["127.0.0.1:9"]
    with pytest.raises(ApplicationError) as caught:
        remote_image_fetch(url="http://127.0.0.1:9/a.png", max_bytes=1000, timeout=2)
    assert caught.value.code == "image_fetch_failed"


@pytest.mark.parametrize(
    ("allowlist", "url", "allowed"),
    [
        (["img.example.com"], "https://img.example.com/a.png", True),
        (["img.example.com"], "https://IMG.example.com./a.png", True),
        (["img.example.com"], "http://img.example.com/a.png", True),
        (["img.example.com"], "https://img.example.com:8443/a.png", False),
        (["img.example.com:8443"], "https://img.example.com:8443/a.png", True),
        (["img.example.com"], "https://evil.img.example.com/a.png", False),
        (["img.example.com"], "https://img.example.com.evil.net/a.png", False),
        (["img.example.com"], "https://user:pw@img.example.com/a.png", False),
        (["img.example.com"], "https://evil.net\\@img.example.com/a.png", False),
        (["img.example.com"], "ftp://img.example.com/a.png", False),
        (["img.example.com"], "https://img.example.com:99999/a.png", False),
        (["[2001:db8::1]"], "https://[2001:db8::1]/a.png", True),
        ([], "https://img.example.com/a.png", False),
    ],
)
def test_allowlist_matching(settings, allowlist, url, allowed) -> None:
    settings.REMOTE_IMAGE_HOST_ALLOWLIST = allowlist
    assert remote_image_allowed(url) is allowed


def test_not_allowlisted_url_is_refused_without_a_request(settings) -> None:
    settings.REMOTE_IMAGE_HOST_ALLOWLIST = ["img.example.com"]
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source="http://127.0.0.1:1/a.png", param="messages[0].content[0]")
    assert (caught.value.code, caught.value.status, caught.value.param) == (
        "image_url_not_allowed",
        400,
        "messages[0].content[0]",
    )
