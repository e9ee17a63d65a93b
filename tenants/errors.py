"""The one application error type that services raise.

It lives in ``tenants`` because that is the lowest layer every other Django app may import.
A single DRF exception handler and one websocket helper render it in the OpenAI error
format ``{"error": {"message", "type", "param", "code"}}``; views never catch it.
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

    def as_openai(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return (
            f"ApplicationError(code={self.code!r}, status={self.status}, message={self.message!r})"
        )
