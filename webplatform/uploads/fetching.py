"""Remote image URLs: refused unless ``settings.REMOTE_IMAGE_HOST_ALLOWLIST`` names the host.

Allowlist entries are exact host names or IP literals, optionally with a port
(``images.example.com``, ``cdn.example.com:8443``, ``[2001:db8::1]``). An entry without a
port allows only the scheme's default port. No wildcards: every host the platform fetches
from is named by the operator, so a client can never make us fetch from our own network
(SSRF). That trust extends to the allowlisted host's DNS; we do not re-check addresses.

An allowed URL is fetched once, directly (no proxy from the environment), with redirects
refused (a redirect could leave the allowlist), a byte cap enforced while reading and an
overall deadline. The fetched bytes then go through the same validation as inline data.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from typing import NoReturn
from urllib.parse import SplitResult, urlsplit

from django.conf import settings

from webplatform.uploads.decoding import image_size_check
from webplatform.uploads.errors import UploadErrorCode, upload_error

MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_READ_CHUNK = 64 * 1024


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx status


def remote_image_allowed(url: str) -> bool:
    """Whether ``url`` is an http(s) URL on an allowlisted host and port."""
    parts = _split(url)
    return parts is not None and _allowlisted(parts)


def remote_image_fetch(
    *, url: str, max_bytes: int, param: str | None = None, timeout: float | None = None
) -> bytes:
    """Fetch an allowlisted image URL; ``image_url_not_allowed``/``image_fetch_failed``/
    ``image_too_large`` otherwise. Blocking: call it in a thread from async code."""
    parts = _split(url)
    if parts is None or not _allowlisted(parts):
        raise upload_error(
            UploadErrorCode.IMAGE_URL_NOT_ALLOWED,
            "Image URLs are not accepted from this host; send the image as a base64 data URI "
            "(data:image/png;base64,...).",
            param=param,
        )
    if timeout is None:
        timeout = float(settings.REMOTE_IMAGE_FETCH_TIMEOUT_SECONDS)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _RefuseRedirects())
    request = urllib.request.Request(
        parts.geturl(), headers={"User-Agent": "vision-platform-image-fetch", "Accept": "image/*"}
    )
    host = parts.hostname
    try:
        with opener.open(request, timeout=timeout) as response:
            if response.status != 200:
                _fetch_failed(f"the server answered HTTP {response.status}", host, param)
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit():
                image_size_check(size=int(declared), max_bytes=max_bytes, param=param)
            body = bytearray()
            while True:
                if time.monotonic() > deadline:
                    _fetch_failed("it took too long", host, param)
                chunk = response.read(_READ_CHUNK)
                if not chunk:
                    break
                body += chunk
                image_size_check(size=len(body), max_bytes=max_bytes, param=param)
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            _fetch_failed(
                f"it redirects (HTTP {exc.code}); redirects are not followed", host, param
            )
        _fetch_failed(f"the server answered HTTP {exc.code}", host, param)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        _fetch_failed(f"{reason}", host, param)
    return bytes(body)


def _split(url: str) -> SplitResult | None:
    if len(url) > MAX_URL_LENGTH:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    return parts


def _allowlisted(parts: SplitResult) -> bool:
    host = _normal_host(parts.hostname or "")
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    for entry in settings.REMOTE_IMAGE_HOST_ALLOWLIST:
        try:
            allowed = urlsplit(f"//{entry.strip()}")
            allowed_port = allowed.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            continue
        if allowed.hostname and _normal_host(allowed.hostname) == host and allowed_port == port:
            return True
    return False


def _normal_host(host: str) -> str:
    return host.lower().rstrip(".")


def _fetch_failed(reason: str, host: str | None, param: str | None) -> NoReturn:
    raise upload_error(
        UploadErrorCode.IMAGE_FETCH_FAILED,
        f"The image could not be fetched from {host}: {reason}.",
        param=param,
    )
