"""``GET /v1/usage``: this tenant's usage today and what is left of its quotas."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.selectors.usage import usage_today_for_tenant
from tenants.services.quotas import duration_format, quota_status
from webplatform.api.base import AuthenticatedApiView
from webplatform.api.schema import UsageSchema, error_responses


class UsageTotalsSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    # The wire name is ``errors``; it shadows Serializer.errors, which this output-only
    # serializer never validates and so never reads.
    errors = serializers.IntegerField()  # type: ignore[assignment]
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    image_count = serializers.IntegerField()


class KeyUsageSerializer(serializers.Serializer):
    key_id = serializers.CharField(source="public_id", allow_null=True)
    name = serializers.CharField(allow_null=True)
    usage = UsageTotalsSerializer(source="totals")


class UsageApi(AuthenticatedApiView):
    # Reading it consumes no quota (see tenants.services.quotas).

    @extend_schema(
        operation_id="getUsage",
        responses={200: UsageSchema, **error_responses(401)},
        summary="Today's usage and rate-limit position of your organisation",
        description="Today's (UTC) usage of the whole organisation and of each of its keys, "
        "and what is left of its rate limits. Calling it uses no quota.",
    )
    def get(self, request: Request) -> Response:
        principal = self.principal
        summary = usage_today_for_tenant(tenant=principal.tenant)
        status = quota_status(tenant_id=principal.tenant_id, limits=principal.limits)
        body = {
            "object": "usage",
            "date": summary.day.isoformat(),
            "usage": UsageTotalsSerializer(summary.totals).data,
            "keys": KeyUsageSerializer(summary.per_key, many=True).data,
            "rate_limits": {
                "requests": {
                    "limit": status.limit_requests,
                    "remaining": status.remaining_requests,
                    "reset": duration_format(status.reset_requests_ms),
                    "window": "1m",
                },
                "tokens": {
                    "limit": status.limit_tokens,
                    "remaining": status.remaining_tokens,
                    "reset": duration_format(status.reset_tokens_ms),
                    "window": "1d",
                },
                "concurrent_requests": {
                    "limit": status.limit_concurrent,
                    "in_flight": status.in_flight,
                },
            },
        }
        return Response(body, headers=status.headers)
