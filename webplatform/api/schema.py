"""OpenAPI description of the public API (drf-spectacular): the API-key security scheme and
the response shapes the views return, so ``/v1/openapi.json`` documents what clients get
and ``manage.py spectacular --validate --fail-on-warn`` passes.

Importing this module registers ``ApiKeyAuthenticationScheme``; the API views import their
response serializers from here, so it is loaded whenever the URLs are.
"""

from __future__ import annotations

import functools
from typing import Any

from django.http import HttpResponse
from django.template import Context, Template
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularRedocView
from rest_framework import serializers


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


# --- errors -----------------------------------------------------------------------------


class ErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    param = serializers.CharField(allow_null=True)
    code = serializers.CharField(allow_null=True)


class ErrorSerializer(serializers.Serializer):
    """OpenAI's error object."""

    error = ErrorDetailSerializer()


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    descriptions = {
        400: "Invalid request (the error code says which rule it broke)",
        401: "Missing, unknown, revoked or expired API key",
        403: "The key may not do this (read-only key)",
        404: "Unknown model or path",
        413: "Request body larger than the plan allows",
        429: "Rate limit, daily token quota or concurrency limit reached",
        503: "Model unavailable or overloaded, or scanner unavailable; retry after `retry-after`",
    }
    return {
        status: OpenApiResponse(response=ErrorSerializer, description=descriptions[status])
        for status in statuses
    }


# --- models -----------------------------------------------------------------------------


class ModelSchemaSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["model"])
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class ModelListSchemaSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=["list"])
    data = ModelSchemaSerializer(many=True)


# --- usage ------------------------------------------------------------------------------


class UsageTotalsSchemaSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    image_count = serializers.IntegerField()


class KeyUsageSchemaSerializer(serializers.Serializer):
    key_id = serializers.CharField(allow_null=True)
    name = serializers.CharField(allow_null=True)
    usage = UsageTotalsSchemaSerializer()


class WindowLimitSchemaSerializer(serializers.Serializer):
    limit = serializers.IntegerField()
    remaining = serializers.IntegerField()
    reset = serializers.CharField(help_text="Duration until the window is full again: '1m0s'")
    window = serializers.CharField()


class ConcurrencyLimitSchemaSerializer(serializers.Serializer):
    limit = serializers.IntegerField()
    in_flight = serializers.IntegerField()


class RateLimitsSchemaSerializer(serializers.Serializer):
    requests = WindowLimitSchemaSerializer()
    tokens = WindowLimitSchemaSerializer()
    concurrent_requests = ConcurrencyLimitSchemaSerializer()


class UsageSchemaSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=["usage"])
    date = serializers.DateField()
    usage = UsageTotalsSchemaSerializer()
    keys = KeyUsageSchemaSerializer(many=True)
    rate_limits = RateLimitsSchemaSerializer()


# --- chat completions -------------------------------------------------------------------


class PromptTokensDetailsSerializer(serializers.Serializer):
    cached_tokens = serializers.IntegerField()
    image_tokens = serializers.IntegerField()


class CompletionTokensDetailsSerializer(serializers.Serializer):
    reasoning_tokens = serializers.IntegerField()


class CompletionUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    prompt_tokens_details = PromptTokensDetailsSerializer()
    completion_tokens_details = CompletionTokensDetailsSerializer()


class AssistantMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["assistant"])
    content = serializers.CharField(allow_blank=True)
    refusal = serializers.CharField(allow_null=True)
    reasoning_content = serializers.CharField(
        required=False, help_text="The model's reasoning, when thinking was enabled"
    )


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    message = AssistantMessageSerializer()
    logprobs = serializers.JSONField(allow_null=True)
    finish_reason = serializers.ChoiceField(choices=["stop", "length"])


class ChatCompletionSerializer(serializers.Serializer):
    """``chat.completion``; with ``stream: true`` the body is instead a stream of Server-Sent
    Events, each a ``chat.completion.chunk``, ending with ``data: [DONE]``."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["chat.completion"])
    created = serializers.IntegerField()
    model = serializers.CharField(help_text="The model that answered (a fallback says so)")
    system_fingerprint = serializers.CharField(allow_null=True)
    choices = ChoiceSerializer(many=True)
    usage = CompletionUsageSerializer()


# --- serving the schema and the docs ----------------------------------------------------


def schema_paths_without_optional_slash(endpoints: list[tuple]) -> list[tuple]:
    """drf-spectacular preprocessing hook: ``re_path(r"^chat/completions/?$")`` becomes
    ``/v1/chat/completions`` (the path clients call), not ``/v1/chat/completions/``."""
    return [
        (path[:-1] if path.endswith("/") and regex.endswith("/?$") else path, regex, *rest)
        for path, regex, *rest in endpoints
    ]


class OpenApiJsonView(SpectacularJSONAPIView):
    """``/v1/openapi.json``: the schema as JSON (the default view answers YAML)."""

    custom_settings = {
        "PREPROCESSING_HOOKS": ["webplatform.api.schema.schema_paths_without_optional_slash"]
    }


# drf-spectacular's Redoc page loads Google Fonts; this one loads nothing from outside the
# platform (the Redoc bundle comes from drf-spectacular-sidecar's static files).
_REDOC_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <title>{{ title }}</title>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <style>body { margin: 0; padding: 0; }</style>
  </head>
  <body>
    <div id="redoc-container"></div>
    <script src="{{ redoc_standalone }}"></script>
    <script>
      Redoc.init("{{ schema_url }}", {}, document.getElementById("redoc-container"));
    </script>
  </body>
</html>
"""


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
        return HttpResponse(
            _redoc_template().render(context), content_type="text/html; charset=utf-8"
        )
