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

The websocket consumer decodes its frames with ``json_value_parse`` too.
"""

from __future__ import annotations

from typing import Any

import msgspec
from django.http import HttpRequest

from tenants.errors import ApplicationError

INVALID_JSON = (
    "We could not parse the JSON body of your request. The body must be UTF-8 JSON without "
    "lone surrogates, NaN or out-of-range numbers."
)


def _too_deep(max_depth: int) -> ApplicationError:
    return ApplicationError(
        f"The JSON body is nested more than {max_depth} levels deep.", code="invalid_json"
    )


def too_large(size: int | None, limit: int) -> ApplicationError:
    told = f"is {size} bytes" if size is not None else "is larger than that"
    return ApplicationError(
        f"The request body {told}; this endpoint accepts at most {limit} bytes here.",
        code="request_too_large",
        status=413,
    )


def _check_depth(value: Any, max_depth: int) -> None:
    """Iterative (no recursion whatever the input): arrays and objects at most
    ``max_depth`` deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise _too_deep(max_depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def json_value_parse(raw: bytes | str, *, max_depth: int) -> Any:
    """``raw`` as a JSON value, or ``ApplicationError`` 400 ``invalid_json``."""
    try:
        value = msgspec.json.decode(raw)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (msgspec.DecodeError, ValueError):  # ValueError: bytes that are not UTF-8
        raise ApplicationError(INVALID_JSON, code="invalid_json") from None
    _check_depth(value, max_depth)
    return value


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
