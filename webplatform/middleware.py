"""Every response carries ``x-request-id``: the usage record's id when the request reached
the model (the chat view sets it), a fresh id otherwise, so a client can always quote one."""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from inference.protocol import new_request_id


class RequestIdMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        if self.is_async:
            return self._acall(request)
        return self._stamp(self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)  # type: ignore[misc]
        return self._stamp(response)

    @staticmethod
    def _stamp(response: HttpResponseBase) -> HttpResponseBase:
        if "x-request-id" not in response:
            response["x-request-id"] = new_request_id()
        return response


__all__ = ["RequestIdMiddleware"]
