from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from webplatform import health
from webplatform.api.schema import ApiDocsView, OpenApiJsonView
from webplatform.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("metrics", metrics_view, name="metrics"),
    # Before the /v1/ catch-all, which answers unknown paths with a JSON 404.
    path("v1/openapi.json", OpenApiJsonView.as_view(), name="openapi-schema"),
    path("v1/docs", ApiDocsView.as_view(url_name="openapi-schema"), name="api-docs"),
    path("v1/", include("webplatform.api.urls")),
    path("", include("webplatform.dashboard.urls")),
]

# JSON errors under /v1/ even when raised outside a DRF view; Django's pages elsewhere.
handler404 = "webplatform.api.errors.not_found"
handler500 = "webplatform.api.errors.server_error"
