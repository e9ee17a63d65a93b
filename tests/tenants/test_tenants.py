"""Memberships: ``membership_get``, the one read of "is this user a member here, and how"."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser

from tenants.errors import ApplicationError
from tenants.models import Membership
from tenants.selectors.tenants import member_principal_get, membership_get

pytestmark = pytest.mark.django_db


def test_a_member_gets_the_membership_with_its_organisation_and_plan(
    owner, teammate, django_assert_num_queries
):
    with django_assert_num_queries(1):
        membership = membership_get(tenant_id=owner.tenant.pk, user=teammate.user)
        assert membership is not None
        assert membership.role == Membership.Role.MEMBER
        assert membership.tenant.name == "Acme"
        assert membership.tenant.plan.name == owner.tenant.plan.name
        assert membership.user.pk == teammate.user.pk


def test_an_outsider_and_a_missing_organisation_look_the_same(owner, outsider):
    missing = max(owner.tenant.pk, outsider.tenant.pk) + 1

    assert membership_get(tenant_id=owner.tenant.pk, user=outsider.user) is None
    assert membership_get(tenant_id=missing, user=owner.user) is None


def test_an_anonymous_visitor_is_a_member_of_nothing(owner, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert membership_get(tenant_id=owner.tenant.pk, user=AnonymousUser()) is None


def test_a_deactivated_account_is_a_member_of_nothing(owner):
    owner.user.is_active = False
    owner.user.save(update_fields=["is_active"])

    assert membership_get(tenant_id=owner.tenant.pk, user=owner.user) is None
    with pytest.raises(ApplicationError) as refused:
        member_principal_get(tenant=owner.tenant, user=owner.user)
    assert (refused.value.status, refused.value.code) == (403, "insufficient_permissions")


def test_the_member_principal_acts_for_the_organisation_only_for_its_members(owner, outsider):
    principal = member_principal_get(tenant=owner.tenant, user=owner.user)
    assert principal.tenant_id == owner.tenant.pk
    assert principal.user == owner.user

    with pytest.raises(ApplicationError) as refused:
        member_principal_get(tenant=owner.tenant, user=outsider.user)
    assert (refused.value.status, refused.value.code) == (403, "insufficient_permissions")
