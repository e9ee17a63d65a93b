"""Shared fixtures. Tests run against the real PostgreSQL and Redis when DATABASE_URL and
REDIS_URL are set (``make test`` sets them); the embedded mode has its own tests.

Personas (healthchecks style): ``owner`` and ``teammate`` belong to one tenant, ``outsider``
owns another. ``api_client_for(key)`` is a DRF client sending ``Authorization: Bearer key``.
Every test gets its own quota key namespace (``QUOTA_KEY_PREFIX``), deleted afterwards, so
runs never see each other's counters even though tenant ids repeat between runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from tenants.models import Membership, Tenant
from tenants.quota_stores import redis_client_for
from tests.factories import MembershipFactory, TenantFactory


@dataclass(frozen=True)
class Persona:
    user: object
    tenant: Tenant
    membership: Membership


@pytest.fixture
def owner(db) -> Persona:
    membership = MembershipFactory(role=Membership.Role.OWNER, tenant=TenantFactory(name="Acme"))
    return Persona(user=membership.user, tenant=membership.tenant, membership=membership)


@pytest.fixture
def teammate(owner: Persona) -> Persona:
    membership = MembershipFactory(tenant=owner.tenant, role=Membership.Role.MEMBER)
    return Persona(user=membership.user, tenant=owner.tenant, membership=membership)


@pytest.fixture
def outsider(db) -> Persona:
    membership = MembershipFactory(role=Membership.Role.OWNER, tenant=TenantFactory(name="Globex"))
    return Persona(user=membership.user, tenant=membership.tenant, membership=membership)


@pytest.fixture
def api_client_for() -> Callable[..., APIClient]:
    def make(raw_key: str | None = None, *, header: str = "authorization") -> APIClient:
        client = APIClient()
        if raw_key is not None:
            if header == "authorization":
                client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
            else:
                client.credentials(HTTP_X_API_KEY=raw_key)
        return client

    return make


@pytest.fixture(autouse=True)
def quota_namespace(settings) -> Iterator[str]:
    """A fresh quota key prefix for this test; its Redis keys are deleted afterwards."""
    prefix = f"test-quota-{uuid.uuid4().hex[:12]}"
    settings.QUOTA_KEY_PREFIX = prefix
    yield prefix
    if settings.REDIS_URL:
        client = redis_client_for(settings.REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real tiny GLM-4.6V checkpoint (random weights, real architecture), built once."""
    import torch

    from inference.tiny_model import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-glm4v"), seed=0)


@pytest.fixture(autouse=True)
def _clamd_scan_slots() -> Iterator[None]:
    """Each test starts with every clamd scan slot free (``CLAMD_MAX_SCANS_IN_FLIGHT``): a
    test that left one taken would slow or fail the next ones, not itself."""
    from webplatform.uploads import scanning

    scanning._scan_slots.cache_clear()
    yield
    scanning._scan_slots.cache_clear()
