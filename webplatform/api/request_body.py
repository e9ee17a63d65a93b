"""A JSON request body, read and parsed under limits before any other work.

- Size: at most ``limit`` bytes are read (413 ``request_too_large``); a declared
  ``Content-Length`` above it is refused before reading. A chunked body (no
  ``Content-Length``) is read the same way: from Django's request, not from DRF's
  ``request.stream``, which is None whenever ``Content-Length`` is absent.
- Parsing: msgspec's decoder (C; a 50 MB body in about 70 ms on one core) accepts only
  JSON: UTF-8, no lone surrogate (escaped or not), no ``NaN``, no number beyond a double,
  no trailing bytes (400 ``invalid_json``, one fixed sentence). Python's own parser takes
  ``"\\ud800"`` and ``NaN``; a lone surrogate then fails far later, when the text is
  encoded for the worker.
- Nesting: at most ``max_depth`` levels of arrays and objects (400 ``invalid_json``); a body
  nested 10,000 deep stops at the decoder's own recursion guard, the same answer.

The parser, ``webplatform.completions.json_input.json_value_parse``, also decodes the
websocket consumer's frames.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from tenants.errors import ApplicationError
from webplatform.completions.json_input import json_value_parse


def too_large(size: int | None, limit: int) -> ApplicationError:
    told = f"is {size} bytes" if size is not None else "is larger than that"
    return ApplicationError(
        f"The request body {told}; this endpoint accepts at most {limit} bytes here.",
        code="request_too_large",
        status=413,
    )


def json_body_read(request: HttpRequest, *, limit: int, max_depth: int) -> Any:
    """The request's JSON body: ``{}`` when empty, 413 beyond ``limit`` bytes."""
    try:
        declared: int | None = int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        declared = None  # absent (chunked) or garbage: count what arrives instead
    if declared is not None and declared > limit:
        raise too_large(declared, limit)
    raw = request.read(limit + 1)
    if len(raw) > limit:
        raise too_large(None, limit)
    if not raw.strip():
        return {}
    return json_value_parse(raw, max_depth=max_depth)
