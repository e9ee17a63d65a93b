"""The audit log: what an administrative action leaves, and who reads it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser
from django.db import transaction

from tenants.models import AuditLogEntry
from tenants.selectors.audit_log import audit_log_for_tenant
from tenants.services.audit_log import audit_log_record

pytestmark = pytest.mark.django_db


def test_an_action_is_recorded_with_its_actor_and_read_by_its_organisation_only(owner, outsider):
    audit_log_record(
        tenant=owner.tenant,
        actor=owner.user,
        action=AuditLogEntry.Action.PLAN_CHANGED,
        target="pro",
        details={"from": "free", "to": "pro"},
    )
    audit_log_record(tenant=outsider.tenant, actor=None, action=AuditLogEntry.Action.KEY_CREATED)

    [entry] = audit_log_for_tenant(tenant=owner.tenant)
    assert (entry.action, entry.target, entry.actor) == ("plan_changed", "pro", owner.user)
    assert entry.details == {"from": "free", "to": "pro"}


def test_an_anonymous_actor_is_recorded_as_nobody_and_a_long_target_is_cut(owner):
    entry = audit_log_record(
        tenant=owner.tenant,
        actor=AnonymousUser(),
        action=AuditLogEntry.Action.MEMBER_INVITED,
        target="x" * 300,
    )
    entry.refresh_from_db()
    assert entry.actor is None
    assert len(entry.target) == 255


def test_an_unknown_action_is_refused(owner):
    with pytest.raises(ValueError):
        audit_log_record(tenant=owner.tenant, actor=owner.user, action="made_coffee")
    assert not AuditLogEntry.objects.exists()


def test_an_action_rolled_back_leaves_no_entry(owner):
    with pytest.raises(RuntimeError), transaction.atomic():
        audit_log_record(
            tenant=owner.tenant, actor=owner.user, action=AuditLogEntry.Action.KEY_REVOKED
        )
        raise RuntimeError("the change failed")
    assert audit_log_for_tenant(tenant=owner.tenant) == []
