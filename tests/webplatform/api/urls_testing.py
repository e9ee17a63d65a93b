"""The real URLs plus test-only views (``@pytest.mark.urls("tests.webplatform.api.urls_testing")``).

``POST /v1/test/admit`` admits through ``quota_admit`` exactly as the chat completions
service does, so tests can drive the quotas and the 429s over HTTP without a model.
"""

from __future__ import annotations

from django.urls import path
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.services.quotas import quota_admit, quota_settle
from webplatform import urls as project_urls
from webplatform.api.base import AuthenticatedApiView


class AdmitForTestApi(AuthenticatedApiView):
    class InputSerializer(serializers.Serializer):
        reserve_tokens = serializers.IntegerField(min_value=0, default=10)
        used_tokens = serializers.IntegerField(min_value=0, default=5)
        hold = serializers.BooleanField(default=False)  # keep the lease: a request in flight

    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        admission = quota_admit(
            tenant_id=self.principal.tenant_id,
            limits=self.principal.limits,
            reserve_tokens=data["reserve_tokens"],
        )
        if not data["hold"]:
            quota_settle(admission=admission, used_tokens=data["used_tokens"])
        return Response({"lease_id": admission.lease_id}, headers=admission.headers)


class BoomApi(AuthenticatedApiView):
    def get(self, request: Request) -> Response:
        raise RuntimeError("boom")


urlpatterns = [
    path("v1/test/admit", AdmitForTestApi.as_view()),
    path("v1/test/boom", BoomApi.as_view()),
    *project_urls.urlpatterns,
]
handler404 = project_urls.handler404
handler500 = project_urls.handler500
