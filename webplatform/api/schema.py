"""OpenAPI description of the public API (drf-spectacular), so ``/v1/openapi.json`` documents
what clients get and ``manage.py spectacular --validate --fail-on-warn`` passes.

The schema is generated from the definitions the code uses, never restated: requests from
their serializers (the chat request from ``webplatform.completions.serializers``), the chat
responses and the error object from the msgspec structs ``webplatform.api.openai_wire``
builds them with. Three extensions teach drf-spectacular what it cannot read by itself:

- ``ApiKeyAuthenticationScheme``: the API-key authentication as HTTP Bearer;
- ``DescribedFieldExtension``: the chat request's fields of several shapes (``content``,
  ``stop``, ...), each stating its own schema (``DescribedField.openapi``);
- ``MsgspecStructExtension``: a msgspec struct as a response (``msgspec``'s own JSON Schema,
  written in OpenAPI 3.0's dialect).

Docstrings and ``help_text`` of what is documented are shown to customers on ``/v1/docs``:
write them for API users, and keep notes for maintainers in comments.

Importing this module registers the extensions; the API views import ``error_responses``
from here, so it is loaded whenever the URLs are.
"""

from __future__ import annotations

import datetime
import functools
import inspect
from typing import Annotated, Any, Literal

import msgspec
from django.http import HttpResponse
from django.template import Context, Template
from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)
from drf_spectacular.plumbing import ResolvedComponent
from drf_spectacular.utils import OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularRedocView
from msgspec import Meta
from rest_framework import serializers

from webplatform.api.openai_wire import ErrorResponse


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """``tenants.authentication.ApiKeyAuthentication`` as OpenAPI's HTTP Bearer scheme (the
    ``X-API-Key`` header is accepted too, but Bearer is what the OpenAI SDKs send)."""

    target_class = "tenants.authentication.ApiKeyAuthentication"
    name = "ApiKeyAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key of your organisation: `Authorization: Bearer sk_...`.",
        }


class DescribedFieldExtension(OpenApiSerializerFieldExtension):
    """A ``DescribedField`` of the chat request: the schema it states, with the serializers
    it names resolved to components."""

    target_class = "webplatform.completions.serializers.DescribedField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        def ref(serializer_class: type[serializers.Serializer]) -> dict[str, Any]:
            component = auto_schema.resolve_serializer(serializer_class, direction)
            return dict(component.ref)

        schema: dict[str, Any] = self.target.openapi(ref)
        return schema


class MsgspecStructExtension(OpenApiSerializerExtension):
    """A msgspec struct as a request or response: msgspec's JSON Schema of it, each struct
    it holds a component of its own."""

    target_class = "msgspec.Struct"
    match_subclasses = True

    def get_name(self, auto_schema: Any, direction: Any) -> str:
        name: str = self.target.__name__
        return name

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        _, components = msgspec.json.schema_components(
            [self.target], ref_template="#/components/schemas/{name}"
        )
        for struct in _structs_within(self.target):
            auto_schema.registry.register_on_missing(
                ResolvedComponent(
                    name=struct.__name__,
                    type=ResolvedComponent.SCHEMA,
                    object=struct,
                    schema=openapi_30(components[struct.__name__]),
                )
            )
        # The struct's own component is registered by drf-spectacular with this schema.
        schema: dict[str, Any] = openapi_30(components[self.target.__name__])
        return schema


def _structs_within(struct: type[msgspec.Struct]) -> list[type[msgspec.Struct]]:
    """The structs ``struct``'s fields hold, at any depth (``struct`` itself not included)."""
    found: dict[type[msgspec.Struct], None] = {}

    def visit(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in found or info.cls is struct:
                return
            found[info.cls] = None
            for field in info.fields:
                visit(field.type)
        elif isinstance(info, msgspec.inspect.UnionType):
            for member in info.types:
                visit(member)
        elif isinstance(info, msgspec.inspect.Metadata):
            visit(info.type)
        elif isinstance(info, msgspec.inspect.ListType):
            visit(info.item_type)

    top = msgspec.inspect.type_info(struct)
    assert isinstance(top, msgspec.inspect.StructType)
    for field in top.fields:
        visit(field.type)
    return list(found)


def openapi_30(schema: Any) -> Any:
    """JSON Schema 2020-12 (msgspec's dialect) as OpenAPI 3.0 writes it: ``null`` as
    ``nullable``, no sibling of a ``$ref``, no empty ``required``, docstrings dedented."""
    if isinstance(schema, list):
        return [openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    schema.pop("title", None)
    nullable = schema.get("type") == "null"
    if nullable:
        del schema["type"]
    any_of = schema.pop("anyOf", None)
    if any_of is not None:
        nullable = nullable or {"type": "null"} in any_of
        rest = [s for s in any_of if s != {"type": "null"}]
        if len(rest) == 1 and "$ref" in rest[0]:
            schema["allOf"] = rest
        elif len(rest) == 1:
            schema = {**rest[0], **schema}
        else:
            schema["anyOf"] = rest
    schema = {key: openapi_30(value) for key, value in schema.items()}
    if nullable:
        schema["nullable"] = True
    if "enum" in schema and "type" not in schema:
        if all(isinstance(value, str) for value in schema["enum"]):
            schema["type"] = "string"
    if schema.get("required") == []:
        del schema["required"]
    if isinstance(schema.get("description"), str):
        schema["description"] = inspect.cleandoc(schema["description"])
    return schema


# --- errors -----------------------------------------------------------------------------


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    descriptions = {
        400: "Invalid request (the error code says which rule it broke)",
        401: "Missing, unknown, revoked or expired API key",
        403: "The key may not do this (read-only key)",
        404: "Unknown model or path",
        413: "Request body larger than the plan allows",
        415: "The body is not `application/json`",
        429: "Rate limit, daily token quota or concurrency limit reached",
        503: "Model unavailable or overloaded, or scanner unavailable; retry after `retry-after`",
    }
    return {
        status: OpenApiResponse(response=ErrorResponse, description=descriptions[status])
        for status in statuses
    }


# --- models and usage: the shapes of GET /v1/models and GET /v1/usage ----------------------


class ModelSchema(msgspec.Struct):
    """A model (OpenAI's `model` object)."""

    id: str
    object: Literal["model"]
    created: Annotated[int, Meta(description="Unix time (seconds).")]
    owned_by: str


class ModelListSchema(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelSchema]


class UsageTotalsSchema(msgspec.Struct):
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    image_count: int


class KeyUsageSchema(msgspec.Struct):
    key_id: Annotated[
        str | None, Meta(description="The key's public id; null for the dashboard's playground.")
    ]
    name: str | None
    usage: UsageTotalsSchema


class WindowLimitSchema(msgspec.Struct):
    limit: int
    remaining: int
    reset: Annotated[str, Meta(description="Duration until the window is full again: '1m0s'")]
    window: str


class ConcurrencyLimitSchema(msgspec.Struct):
    limit: int
    in_flight: int


class RateLimitsSchema(msgspec.Struct):
    requests: WindowLimitSchema
    tokens: WindowLimitSchema
    concurrent_requests: ConcurrencyLimitSchema


class UsageSchema(msgspec.Struct):
    object: Literal["usage"]
    date: datetime.date
    usage: UsageTotalsSchema
    keys: list[KeyUsageSchema]
    rate_limits: RateLimitsSchema


# --- serving the schema and the docs ----------------------------------------------------


def schema_paths_without_optional_slash(endpoints: list[tuple]) -> list[tuple]:
    """drf-spectacular preprocessing hook: ``re_path(r"^chat/completions/?$")`` becomes
    ``/v1/chat/completions`` (the path clients call), not ``/v1/chat/completions/``."""
    return [
        (path[:-1] if path.endswith("/") and regex.endswith("/?$") else path, regex, *rest)
        for path, regex, *rest in endpoints
    ]


SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "One Server-Sent Event of a streamed answer. Its `data` is a "
    "`chat.completion.chunk` as JSON (schema `ChatCompletionChunk`), an error object "
    "(`ErrorResponse`) when the stream fails after it started, or `[DONE]`, the last.",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def chat_request_rules(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the chat request's rules across fields, which
    no single field states: ``messages`` or ``prompt`` is required, and ``stream_options``
    (a non-empty one) only with ``stream: true``. Rules OpenAPI 3.0 cannot state at all
    (the last message comes from the user; an image decodes; ``max_tokens`` within the
    plan) are told in the descriptions and answered 400."""
    operation = result.get("paths", {}).get("/v1/chat/completions", {}).get("post")
    if operation is not None:
        operation["requestBody"]["required"] = True
        # A Server-Sent Event as SSE tools read it (`data` and the optional fields); its
        # `data` is JSON of the ChatCompletionChunk component, or `[DONE]`.
        sse = operation["responses"]["200"]["content"]["text/event-stream"]
        sse["schema"] = SSE_EVENT_SCHEMA
    component = result.get("components", {}).get("schemas", {}).get("ChatCompletionRequest")
    if component is not None:
        component["allOf"] = [
            {
                "anyOf": [
                    {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
                    {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                ]
            },
            {
                "anyOf": [
                    {"required": ["stream"], "properties": {"stream": {"enum": [True]}}},
                    {"not": {"required": ["stream_options"]}},
                    {"properties": {"stream_options": {"type": "object", "maxProperties": 0}}},
                ]
            },
        ]
    return result


class OpenApiJsonView(SpectacularJSONAPIView):
    """``/v1/openapi.json``: the schema as JSON (the default view answers YAML)."""

    custom_settings = {
        "PREPROCESSING_HOOKS": ["webplatform.api.schema.schema_paths_without_optional_slash"],
        "POSTPROCESSING_HOOKS": [
            "drf_spectacular.hooks.postprocess_schema_enums",
            "webplatform.api.schema.chat_request_rules",
        ],
    }


# drf-spectacular's Redoc page loads Google Fonts; this one loads nothing from outside the
# platform (the Redoc bundle comes from drf-spectacular-sidecar's static files). No inline
# script: the bundle initialises the <redoc spec-url> element itself (Content-Security-Policy).
_REDOC_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <title>{{ title }}</title>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
  </head>
  <body>
    <redoc spec-url="{{ schema_url }}"></redoc>
    <script src="{{ redoc_standalone }}"></script>
  </body>
</html>
"""

# Redoc writes its styles as <style> elements and runs its search in a blob: worker: this
# page alone allows both (webplatform/settings.py, CONTENT_SECURITY_POLICY).
REDOC_CSP_UPDATE = {"style-src": ["'unsafe-inline'"], "worker-src": ["'self'", "blob:"]}


@functools.cache
def _redoc_template() -> Template:
    return Template(_REDOC_PAGE)


class ApiDocsView(SpectacularRedocView):
    """``/v1/docs``: Redoc over ``/v1/openapi.json``, with no CDN or font-service URL."""

    @extend_schema(exclude=True)
    def get(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponse:
        context = Context(
            {
                "title": self.title,
                "redoc_standalone": self._redoc_standalone(),
                "schema_url": self._get_schema_url(request),
            }
        )
        response = HttpResponse(
            _redoc_template().render(context), content_type="text/html; charset=utf-8"
        )
        response._csp_update = REDOC_CSP_UPDATE  # type: ignore[attr-defined]  # django-csp
        return response
