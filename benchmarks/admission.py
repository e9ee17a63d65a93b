"""What authentication and admission cost per request.

Three DRF views, called in one process through Django's ``RequestFactory`` (no HTTP server,
no middleware), in interleaved rounds so drift hits all alike:

- ``anonymous``: no authentication, returns ``{}`` (the floor: DRF itself);
- ``authenticated``: ``ApiKeyAuthentication`` + ``IsAuthenticated``, returns ``{}``;
- ``admitted``: an ``AuthenticatedApiView`` that authenticates, ``quota_admit``s (reserving
  256 tokens) and ``quota_settle``s (100 used), the path a chat completion takes around the
  model, with the ``x-ratelimit-*`` headers from the admission.

It creates its own database the way the test runner does (``TEST_DATABASE_NAME`` or
``test_<name>``, migrated, destroyed at the end), a throwaway tenant and key, and a fresh
quota key prefix whose Redis keys it deletes. Run it against the production-style services:

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/1 \\
    TEST_DATABASE_NAME=bench_tenants CACHE_KEY_PREFIX=wp_bench \\
    .venv/bin/python benchmarks/admission.py --requests 5000

With DATABASE_URL and REDIS_URL unset it measures the embedded mode (SQLite, process-local
cache and quota store).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webplatform.settings")

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import RequestFactory  # noqa: E402
from rest_framework.permissions import AllowAny, IsAuthenticated  # noqa: E402
from rest_framework.request import Request  # noqa: E402
from rest_framework.response import Response  # noqa: E402
from rest_framework.views import APIView  # noqa: E402

from tenants.authentication import ApiKeyAuthentication  # noqa: E402
from tenants.models import Plan  # noqa: E402
from tenants.quota_stores import quota_store_get, redis_client_for  # noqa: E402
from tenants.services.api_keys import api_key_create  # noqa: E402
from tenants.services.quotas import quota_admit, quota_settle  # noqa: E402
from tenants.services.tenants import tenant_create  # noqa: E402
from webplatform.api.base import AuthenticatedApiView  # noqa: E402


class AnonymousNoopApi(APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    def get(self, request: Request) -> Response:
        return Response({})


class AuthenticatedNoopApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsAuthenticated]

    def get(self, request: Request) -> Response:
        return Response({})


class AdmittedApi(AuthenticatedApiView):
    def post(self, request: Request) -> Response:
        admission = quota_admit(
            tenant_id=self.principal.tenant_id, limits=self.principal.limits, reserve_tokens=256
        )
        quota_settle(admission=admission, used_tokens=100)
        return Response({}, headers=admission.headers)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="per view")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=300, help="per view")
    args = parser.parse_args()

    settings.QUOTA_KEY_PREFIX = f"bench-quota-{uuid.uuid4().hex[:12]}"
    settings.DEBUG = False
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        plan = Plan.objects.create(
            name=f"bench-{uuid.uuid4().hex[:8]}",
            requests_per_minute=10**9,
            tokens_per_day=10**15,
            concurrent_requests=10**6,
            max_output_tokens=4096,
        )
        tenant = tenant_create(name="Benchmark", plan=plan)
        raw_key = api_key_create(tenant=tenant, name="bench").raw_key
        factory = RequestFactory()
        auth = {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}
        views = {
            "anonymous": (AnonymousNoopApi.as_view(), lambda: factory.get("/bench")),
            "authenticated": (
                AuthenticatedNoopApi.as_view(),
                lambda: factory.get("/bench", **auth),
            ),
            "admitted": (
                AdmittedApi.as_view(),
                lambda: factory.post("/bench", b"", content_type="application/json", **auth),
            ),
        }
        timings: dict[str, list[float]] = {name: [] for name in views}
        for name, (view, make_request) in views.items():
            for _ in range(args.warmup):
                assert view(make_request()).status_code == 200, name
        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for name, (view, make_request) in views.items():
                for _ in range(per_round):
                    request = make_request()
                    start = time.perf_counter_ns()
                    response = view(request)
                    timings[name].append((time.perf_counter_ns() - start) / 1000)
                    assert response.status_code == 200, (name, response.status_code)

        store = type(quota_store_get()).__name__
        cache_backend = settings.CACHES["default"]["BACKEND"].rsplit(".", 1)[-1]
        print(
            f"database={connection.vendor} cache={cache_backend} quota_store={store} "
            f"requests/view={per_round * args.rounds} python={sys.version.split()[0]}"
        )
        print(f"{'view':<15}{'median us':>12}{'p99 us':>12}")
        summary = {}
        for name, values in timings.items():
            values.sort()
            summary[name] = (statistics.median(values), _percentile(values, 0.99))
            print(f"{name:<15}{summary[name][0]:>12.1f}{summary[name][1]:>12.1f}")
        if settings.REDIS_URL:
            client = redis_client_for(settings.REDIS_URL)
            pings = []
            for _ in range(2000):
                start = time.perf_counter_ns()
                client.ping()
                pings.append((time.perf_counter_ns() - start) / 1000)
            print(
                f"(one Redis round trip, PING from redis-py: median {statistics.median(pings):.1f} us)"
            )
        auth_median, auth_p99 = summary["authenticated"]
        admit_median, admit_p99 = summary["admitted"]
        print(
            f"admitted / authenticated: median {admit_median / auth_median:.2f}x, "
            f"p99 {admit_p99 / auth_p99:.2f}x; admission + settle adds "
            f"{admit_median - auth_median:.1f} us (median)"
        )
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        if settings.REDIS_URL:
            client = redis_client_for(settings.REDIS_URL)
            keys = list(client.scan_iter(match=f"{settings.QUOTA_KEY_PREFIX}:*", count=1000))
            if keys:
                client.delete(*keys)


if __name__ == "__main__":
    main()
