"""The one application error type that services raise.

It lives in ``tenants`` because that is the lowest layer every other Django app may import.
The web side renders it: the REST exception handler and the SSE stream in the OpenAI error
format ``{"error": {"message", "type", "param", "code"}}`` (``webplatform.api.openai_wire``
builds that body), the websocket chat as an ``error`` frame; views never catch it.
"""

from __future__ import annotations

from collections.abc import Mapping


class ApplicationError(Exception):
    """An error a client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.type = type
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def __repr__(self) -> str:
        return (
            f"ApplicationError(code={self.code!r}, status={self.status}, message={self.message!r})"
        )
