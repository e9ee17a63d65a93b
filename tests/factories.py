"""factory_boy factories. API keys go through the service (``api_key_for``), never a factory
that fakes a hash, so tests use keys exactly as clients do."""

from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from django.utils.text import slugify

from tenants.models import Membership, Plan, Tenant
from tenants.services.api_keys import CreatedApiKey, api_key_create


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}@example.com")
    email = factory.LazyAttribute(lambda user: user.username)
    # Unusable and saved with the row (a post-generation call would not be saved, and a
    # session made by force_login would then never verify).
    password = factory.django.Password(None)


class PlanFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Plan

    name = factory.Sequence(lambda n: f"plan-{n}")
    requests_per_minute = 60
    tokens_per_day = 1_000_000
    concurrent_requests = 4
    max_output_tokens = 2048
    allowed_models = factory.LazyFunction(list)


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"Tenant {n}")
    slug = factory.LazyAttribute(lambda tenant: slugify(tenant.name))
    plan = factory.SubFactory(PlanFactory)


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    tenant = factory.SubFactory(TenantFactory)
    role = Membership.Role.MEMBER


def api_key_for(tenant: Tenant, *, name: str = "test key", **options: object) -> CreatedApiKey:
    """A real key for ``tenant`` made by ``api_key_create`` (options: allowed_models,
    access, expires_at, created_by)."""
    return api_key_create(tenant=tenant, name=name, **options)  # type: ignore[arg-type]
