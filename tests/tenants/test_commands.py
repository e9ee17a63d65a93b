"""Management commands: create_tenant, create_api_key, revoke_api_key, demo_setup."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from tenants.errors import ApplicationError
from tenants.models import ApiKey, Membership, Tenant
from tenants.services.api_keys import api_key_authenticate
from tests.factories import api_key_for

pytestmark = pytest.mark.django_db

KEY_RE = re.compile(r"sk_[A-Za-z0-9]{12}_[A-Za-z0-9]{40}")


def _run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_create_tenant_with_a_new_owner(capsys):
    out, _ = _run(
        "create_tenant", "Initech Ltd", "--plan", "pro", "--owner-email", "bill@initech.test"
    )

    tenant = Tenant.objects.get(slug="initech-ltd")
    assert tenant.plan.name == "pro"
    membership = Membership.objects.get(tenant=tenant)
    assert membership.role == Membership.Role.OWNER
    assert membership.user.email == "bill@initech.test"
    assert not membership.user.has_usable_password()
    assert "changepassword bill@initech.test" in out


def test_create_tenant_reuses_an_existing_user(owner):
    out, _ = _run("create_tenant", "Second Org", "--owner-email", owner.user.email)

    assert Tenant.objects.get(slug="second-org").memberships.get().user == owner.user
    assert get_user_model().objects.filter(email=owner.user.email).count() == 1
    assert "changepassword" not in out


def test_create_tenant_with_an_unknown_plan_fails():
    with pytest.raises(CommandError, match="No plan named 'gold'"):
        _run("create_tenant", "X", "--plan", "gold")
    assert not Tenant.objects.filter(name="X").exists()


def test_create_api_key_prints_the_key_alone_on_stdout(owner):
    out, err = _run("create_api_key", owner.tenant.slug, "--name", "ci")

    assert KEY_RE.fullmatch(out.strip())
    assert out.count("\n") == 1
    assert api_key_authenticate(raw_key=out.strip()).tenant == owner.tenant
    assert "shown once" in err


def test_create_api_key_options(owner, settings):
    settings.INFERENCE_MODELS = {"a": {}, "b": {}}
    out, _ = _run(
        "create_api_key",
        str(owner.tenant.pk),
        "--name",
        "dash",
        "--scope-models",
        "b",
        "--read-only",
        "--expires-days",
        "7",
    )

    api_key = ApiKey.objects.get(public_id=out.strip().split("_")[1])
    assert api_key.tenant == owner.tenant
    assert api_key.allowed_models == ["b"]
    assert api_key.access == ApiKey.Access.READ
    assert api_key.expires_at is not None


def test_create_api_key_for_an_unknown_tenant_fails(db):
    with pytest.raises(CommandError, match="No tenant"):
        _run("create_api_key", "nobody", "--name", "x")


def test_revoke_api_key(owner):
    created = api_key_for(owner.tenant)
    api_key_authenticate(raw_key=created.raw_key)

    out, _ = _run("revoke_api_key", created.api_key.public_id)

    assert "revoked" in out
    with pytest.raises(ApplicationError) as caught:
        api_key_authenticate(raw_key=created.raw_key)
    assert caught.value.code == "api_key_revoked"


def test_demo_setup_is_idempotent_and_prints_a_fresh_working_key():
    first, _ = _run("demo_setup")
    second, _ = _run("demo_setup", "--port", "9000")

    assert Tenant.objects.filter(slug="demo").count() == 1
    first_key = KEY_RE.search(first).group(0)
    second_key = KEY_RE.search(second).group(0)
    assert first_key != second_key
    with pytest.raises(ApplicationError) as caught:
        api_key_authenticate(raw_key=first_key)
    assert caught.value.code == "api_key_revoked"
    assert api_key_authenticate(raw_key=second_key).tenant.slug == "demo"
    assert (
        f'curl -s http://127.0.0.1:9000/v1/models -H "Authorization: Bearer {second_key}"' in second
    )
    assert "http://127.0.0.1:9000/" in second
