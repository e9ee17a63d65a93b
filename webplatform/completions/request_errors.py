"""Which one error a chat request that failed validation is told, for both entry points.

The serializers (``webplatform.completions.serializers``) fail a rule written for this API
with a ``ValidationError`` carrying one of ``RULE_CODES`` (``rule_broken``) and a message
shown to the client as it is; DRF's own field checks (a type, a range) keep DRF's code and
wording. A request that breaks several is told one: a field of the wrong type or out of
range first, then a feature this API does not support, then a malformed message, stop list
or option (``request_fault``). ``chat_request_error`` words it for ``POST
/v1/chat/completions``, ``frame_error`` for the websocket's ``message`` frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail

from tenants.errors import ApplicationError

INVALID_REQUEST = "invalid_request"
UNSUPPORTED_VALUE = "unsupported_value"
UNSUPPORTED_PARAMETER = "unsupported_parameter"
# Codes of this API's own rules, with the rank of each among the errors of a request that
# breaks several (DRF's own field checks rank 0): a feature we do not support, then a
# malformed value.
RULE_CODES = {UNSUPPORTED_VALUE: 1, UNSUPPORTED_PARAMETER: 1, INVALID_REQUEST: 2}


def rule_broken(message: str, *, code: str = INVALID_REQUEST) -> serializers.ValidationError:
    return serializers.ValidationError(message, code=code)


@dataclass(frozen=True)
class RequestFault:
    """The one error of a request that is told to the client."""

    path: tuple[str | int, ...]
    detail: ErrorDetail

    @property
    def param(self) -> str | None:
        """The field's path as OpenAI writes it: ``messages[0].content[1].image_url``."""
        text = ""
        for step in self.path:
            if isinstance(step, int) or (isinstance(step, str) and step.isdigit()):
                text += f"[{step}]"
            elif step != "non_field_errors":
                text += f".{step}" if text else step
        return text or None

    @property
    def is_rule(self) -> bool:
        return self.detail.code in RULE_CODES


def _faults(detail: Any, path: tuple[str | int, ...] = ()) -> Iterator[RequestFault]:
    if isinstance(detail, dict):
        for key, value in detail.items():
            yield from _faults(value, (*path, key))
    elif isinstance(detail, list):
        for item in detail:
            yield from _faults(item, path)
    else:
        yield RequestFault(path=path, detail=detail)


def request_fault(errors: Any) -> RequestFault:
    """The error a request with the DRF ``errors`` is told: by rank (``RULE_CODES``), then
    the first in field order."""

    faults = list(_faults(errors))
    return min(faults, key=lambda fault: RULE_CODES.get(str(fault.detail.code), 0))


def chat_request_error(errors: Any) -> Exception:
    """What ``POST /v1/chat/completions`` raises for a body that failed validation: this
    API's rule as an ``ApplicationError``, or DRF's own check as a ``ValidationError`` of that
    field alone, which the REST exception handler words as it words every API's."""
    fault = request_fault(errors)
    if fault.is_rule:
        return ApplicationError(str(fault.detail), code=str(fault.detail.code), param=fault.param)
    return serializers.ValidationError({fault.param or "non_field_errors": [fault.detail]})


def frame_error(errors: Any, *, message_index: int) -> ApplicationError:
    """What a websocket ``message`` frame that failed validation is answered: its content's
    fault first (named as the conversation's message ``message_index``), then the options';
    an option's DRF check as ``"<option>: <what is wrong>"``, code ``invalid_request``."""
    content = errors.get("content") if isinstance(errors, dict) else None
    if content:
        fault = request_fault({"content": content})
        param = f"messages[{message_index}].{fault.param}"
        return ApplicationError(str(fault.detail), code=str(fault.detail.code), param=param)
    fault = request_fault(errors)
    if fault.is_rule:
        return ApplicationError(str(fault.detail), code=str(fault.detail.code), param=fault.param)
    return ApplicationError(
        f"{fault.param}: {fault.detail}", code=INVALID_REQUEST, param=fault.param
    )


__all__ = [
    "INVALID_REQUEST",
    "RULE_CODES",
    "UNSUPPORTED_PARAMETER",
    "UNSUPPORTED_VALUE",
    "RequestFault",
    "chat_request_error",
    "frame_error",
    "request_fault",
    "rule_broken",
]
