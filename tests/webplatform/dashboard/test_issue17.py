"""Dashboard fixes of issue 17 checked through Django's test client (where a browser adds
nothing); the browser journeys are in ``test_journeys``."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from tenants.services.invitations import invitation_create

PASSWORD = "correct horse battery 42"


def invite(persona, email: str, role: str = "member") -> str:
    created = invitation_create(
        tenant=persona.tenant,
        email=email,
        role=role,
        invited_by=persona.user,
        actor_role="owner",
        accept_url_for=lambda token: f"/invitations/{token}/",
    )
    return created.token


@pytest.mark.django_db
def test_an_invited_sign_up_with_another_address_creates_nothing(owner) -> None:
    token = invite(owner, "grace@example.com")
    response = Client().post(
        reverse("dashboard:signup"),
        {
            "invitation": token,
            "email": "mallory@example.com",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert response.status_code == 200
    assert "another e-mail address" in response.content.decode()
    assert not User.objects.filter(email="mallory@example.com").exists()


@pytest.mark.django_db
def test_a_new_invitation_supersedes_the_old_and_accepting_clears_the_address(
    owner, client_for
) -> None:
    from tenants.models import Invitation
    from tenants.selectors.invitations import invitation_list_pending

    first = invite(owner, "grace@example.com")
    second = invite(owner, "Grace@example.com", role="admin")
    # Only the newest invitation is pending; the first link is void.
    assert [i.role for i in invitation_list_pending(tenant=owner.tenant)] == ["admin"]
    assert Client().get(f"/invitations/{first}/").status_code == 404

    grace = User.objects.create_user("grace@example.com", "grace@example.com", PASSWORD)
    # An older invitation that was never superseded (made before this rule) is voided too.
    third = invite(owner, "other@example.com")
    Invitation.objects.filter(email="other@example.com").update(email="grace@example.com")
    client = Client()
    client.force_login(grace)
    assert client.post(f"/invitations/{second}/").status_code == 302
    assert list(invitation_list_pending(tenant=owner.tenant)) == []
    members_page = client_for(owner).get(reverse("dashboard:members", args=[owner.tenant.pk]))
    assert "Pending invitations" not in members_page.content.decode()
    assert Client().get(f"/invitations/{third}/").status_code == 404


def _bad_png_uri() -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()


@pytest.mark.django_db
def test_refused_api_calls_show_in_usage_errors_and_the_error_filter(
    owner, client_for, api_client_for
) -> None:
    from tenants.models import ApiKey, UsageRecord
    from tests.factories import api_key_for

    full = api_key_for(owner.tenant).raw_key
    read = api_key_for(owner.tenant)
    ApiKey.objects.filter(pk=read.api_key.pk).update(access="read")
    url = "/v1/chat/completions"
    text = [{"role": "user", "content": "hi"}]
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": _bad_png_uri()}},
            ],
        }
    ]
    calls = [
        (full, {"model": "glm-4.6v-flash", "messages": image}, 400),
        (full, {"model": "glm-4.6v-flash", "messages": text, "max_tokens": 10**7}, 400),
        (read.raw_key, {"model": "glm-4.6v-flash", "messages": text}, 403),
        (full, {"model": "no-such-model", "messages": text}, 404),
    ]
    codes = []
    for key, body, status in calls:
        response = api_client_for(key).post(url, body, format="json")
        assert response.status_code == status, response.content
        codes.append(response.json()["error"]["code"])
        request_id = response["x-request-id"]
        record = UsageRecord.objects.get(request_id=request_id)
        assert (record.tenant_id, record.status) == (owner.tenant.pk, "error")
        assert record.error_code == codes[-1]
    # An unauthenticated call belongs to nobody and is not recorded.
    assert api_client_for("sk_nope_nope").post(url, calls[1][1], format="json").status_code == 401
    assert UsageRecord.objects.count() == 4

    client = client_for(owner)
    usage = client.get(reverse("dashboard:usage", args=[owner.tenant.pk]))
    assert usage.context["totals"]["errors"] == 4
    log = client.get(reverse("dashboard:requests", args=[owner.tenant.pk]), {"status": "error"})
    page = log.content.decode()
    for code in codes:
        assert code in page
    assert "No requests yet." not in page


def _records(tenant, days_ago_counts: dict[int, int]) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from tenants.models import UsageRecord

    now = timezone.now()
    UsageRecord.objects.bulk_create(
        UsageRecord(
            tenant=tenant,
            request_id=f"req-{days}-{i}",
            channel="rest",
            model="glm-4.6v-flash",
            status="ok",
            created_at=now - timedelta(days=days, seconds=i),
        )
        for days, count in days_ago_counts.items()
        for i in range(count)
    )


@pytest.mark.django_db
def test_the_request_log_pages_and_takes_a_date_range(owner, client_for) -> None:
    from datetime import timedelta

    from django.utils import timezone

    _records(owner.tenant, {0: 70, 10: 50})
    client = client_for(owner)
    url = reverse("dashboard:requests", args=[owner.tenant.pk])
    first = client.get(url)
    assert len(first.context["rows"]) == 50
    assert "Showing 1–50 of 120, newest first." in first.content.decode()
    last = client.get(url, {"page": 3, "status": "ok"})
    assert len(last.context["rows"]) == 20
    assert "Page 3 of 3" in last.content.decode()
    assert "status=ok&amp;page=2" in last.content.decode()  # the filters stay on the pager
    older = (timezone.now() - timedelta(days=10)).date().isoformat()
    ranged = client.get(url, {"start": older, "end": older})
    assert {r["record"].request_id[:6] for r in ranged.context["rows"]} == {"req-10"}
    assert "of 50," in ranged.content.decode()
    wrong = client.get(url, {"start": "2026-02-02", "end": "2026-01-01"})
    assert "The end date is before the start date." in wrong.content.decode()


@pytest.mark.django_db
def test_the_audit_log_pages_and_takes_a_date_range(owner, client_for) -> None:
    from tenants.models import AuditLogEntry

    AuditLogEntry.objects.bulk_create(
        AuditLogEntry(tenant=owner.tenant, action="plan_changed", target=str(i)) for i in range(230)
    )
    client = client_for(owner)
    url = reverse("dashboard:audit", args=[owner.tenant.pk])
    total = AuditLogEntry.objects.filter(tenant=owner.tenant).count()
    page = client.get(url, {"page": 5})
    assert len(page.context["entries"]) == total - 200
    assert f"of {total:,}" in page.content.decode() or f"of {total}" in page.content.decode()
    assert client.get(url, {"start": "2001-01-01", "end": "2001-01-02"}).context["entries"] == []


@pytest.mark.django_db
def test_only_an_owner_changes_the_plan_and_only_to_a_self_serve_plan(
    owner, org_admin, client_for
) -> None:
    from tenants.models import Plan, Tenant
    from tenants.services.tenants import plans_ensure_defaults

    plans_ensure_defaults()
    free = Plan.objects.get(name="free")
    Tenant.objects.filter(pk=owner.tenant.pk).update(plan=free)
    pro = Plan.objects.get(name="pro")
    enterprise = Plan.objects.create(
        name="enterprise",
        requests_per_minute=10_000,
        tokens_per_day=10**9,
        concurrent_requests=100,
        max_image_bytes=20 * 2**20,
        max_output_tokens=4096,
    )
    url = reverse("dashboard:plan-change", args=[owner.tenant.pk])
    settings_url = reverse("dashboard:settings", args=[owner.tenant.pk])
    # An admin sees the plans but may not switch.
    assert client_for(org_admin).post(url, {"plan": pro.pk, "confirm": "yes"}).status_code == 403
    owner_client = client_for(owner)
    offered = owner_client.get(settings_url).context["plan_form"].fields["plan"].queryset
    assert set(offered.values_list("name", flat=True)) == {"free", "pro"}
    refused = owner_client.post(url, {"plan": enterprise.pk, "confirm": "yes"})
    assert refused.status_code == 400
    assert owner_client.post(url, {"plan": pro.pk}).status_code == 200  # the confirmation
    assert Tenant.objects.get(pk=owner.tenant.pk).plan_id == free.pk
    assert owner_client.post(url, {"plan": pro.pk, "confirm": "yes"}).status_code == 302
    assert Tenant.objects.get(pk=owner.tenant.pk).plan_id == pro.pk


@pytest.mark.django_db
def test_the_service_refuses_a_plan_that_is_not_self_serve(owner) -> None:
    from tenants.errors import ApplicationError
    from tenants.models import Plan
    from tenants.services.organisations import organisation_plan_change

    enterprise = Plan.objects.create(
        name="enterprise",
        requests_per_minute=1,
        tokens_per_day=1,
        concurrent_requests=1,
        max_image_bytes=1,
        max_output_tokens=1,
    )
    with pytest.raises(ApplicationError) as refused:
        organisation_plan_change(tenant=owner.tenant, plan=enterprise, actor=owner.user)
    assert refused.value.code == "plan_not_self_serve"
    organisation_plan_change(
        tenant=owner.tenant, plan=enterprise, actor=owner.user, self_serve=False
    )


@pytest.mark.django_db
def test_chinese_overview_names_the_plan_and_role_and_audit_details_read_well(
    owner, client_for, compiled_translations
) -> None:
    from tenants.services.api_keys import api_key_create_audited

    api_key_create_audited(
        tenant=owner.tenant,
        name="ci",
        created_by=owner.user,
        allowed_models=["ocr-lite"],
        access="read",
        expires_at=None,
    )
    client = client_for(owner)
    zh = {"HTTP_ACCEPT_LANGUAGE": "zh-hans"}
    overview = client.get(reverse("dashboard:overview", args=[owner.tenant.pk]), **zh)
    text = overview.content.decode()
    plan = owner.tenant.plan.name
    assert {"free": "免费版", "pro": "专业版"}.get(plan, plan) in text
    assert "你的角色：所有者" in text
    assert "Owner" not in text
    audit = client.get(reverse("dashboard:audit", args=[owner.tenant.pk]), **zh)
    details = audit.content.decode()
    assert "['ocr-lite']" not in details and "模型: ocr-lite" in details
    assert "访问权限: 只读" in details or "访问: 只读" in details


@pytest.mark.django_db
def test_the_password_help_follows_the_page_language(compiled_translations) -> None:
    english = Client().get(reverse("dashboard:signup")).content.decode()
    chinese = Client().get(reverse("dashboard:signup"), HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert "Your password must contain at least" in english
    assert "Your password must contain" not in chinese.content.decode()


def test_durations_and_numbers_are_for_people() -> None:
    from django.utils import translation

    from webplatform.templatetags.dashboard_format import duration_ms, num

    with translation.override("en"):
        assert [duration_ms(850), duration_ms(55_912), duration_ms(21_747_084)] == [
            "850 ms",
            "55.9 sec",
            "6 hr 2 min",
        ]
        assert num(1234567) == "1,234,567"
    with translation.override("zh-hans"):
        assert duration_ms(21_747_084) == "6小时2分钟"
        assert duration_ms(55_912) == "55.9秒"


@pytest.mark.django_db
def test_the_login_error_speaks_of_the_email_address(owner) -> None:
    response = Client().post(
        reverse("dashboard:login"), {"username": "nobody@example.com", "password": "wrong"}
    )
    text = response.content.decode()
    assert "correct e-mail address and password" in text
    assert "correct username" not in text


@pytest.mark.django_db
def test_a_request_detail_is_the_tenants_own_and_shows_content_to_admins_only(
    owner, teammate, outsider, client_for
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from tenants.models import ContentLogEntry, Tenant, UsageRecord

    record = UsageRecord.objects.create(
        tenant=owner.tenant,
        request_id="chatcmpl-mine",
        channel="rest",
        model="glm-4.6v-flash",
        status="ok",
        created_at=timezone.now(),
    )
    Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=True)
    ContentLogEntry.objects.create(
        tenant=owner.tenant,
        request_id=record.request_id,
        prompt="what is this?",
        answer="a red square",
        expires_at=timezone.now() + timedelta(days=1),
    )
    url = reverse("dashboard:request-detail", args=[owner.tenant.pk, record.request_id])
    assert "a red square" in client_for(owner).get(url).content.decode()
    assert "a red square" not in client_for(teammate).get(url).content.decode()
    # Another organisation's member, or another organisation's path: nothing.
    assert client_for(outsider).get(url).status_code == 404
    theirs = reverse("dashboard:request-detail", args=[outsider.tenant.pk, record.request_id])
    assert client_for(outsider).get(theirs).status_code == 404
    search = reverse("dashboard:requests", args=[outsider.tenant.pk])
    found = client_for(outsider).get(search, {"request_id": record.request_id})
    assert found.status_code == 200  # not a redirect to the other tenant's request


@pytest.mark.django_db
def test_a_key_is_renamed_only_in_its_own_organisation(owner, outsider, client_for) -> None:
    from tenants.models import ApiKey
    from tests.factories import api_key_for

    theirs = api_key_for(outsider.tenant, name="theirs").api_key
    url = reverse("dashboard:key-rename", args=[owner.tenant.pk, theirs.public_id])
    assert client_for(owner).post(url, {"name": "mine now"}).status_code == 404
    assert ApiKey.objects.get(pk=theirs.pk).name == "theirs"
    own = reverse("dashboard:key-rename", args=[outsider.tenant.pk, theirs.public_id])
    assert client_for(owner).post(own, {"name": "x"}).status_code == 404
    client_for(outsider).post(own, {"name": "  "})
    assert ApiKey.objects.get(pk=theirs.pk).name == "theirs"


@pytest.mark.django_db
def test_renames_and_spend_limit_changes_are_in_the_audit_log(owner, client_for) -> None:
    from tenants.models import AuditLogEntry
    from tests.factories import api_key_for

    key = api_key_for(owner.tenant, name="old key name").api_key
    client = client_for(owner)
    tenant_id = owner.tenant.pk
    old_org_name = owner.tenant.name
    client.post(reverse("dashboard:key-rename", args=[tenant_id, key.public_id]), {"name": "ci"})
    client.post(reverse("dashboard:key-rename", args=[tenant_id, key.public_id]), {"name": "ci"})
    client.post(reverse("dashboard:org-rename", args=[tenant_id]), {"name": "Acme Labels"})
    client.post(reverse("dashboard:spend-limit", args=[tenant_id]), {"limit": "2.50"})
    client.post(reverse("dashboard:spend-limit", args=[tenant_id]), {"limit": ""})

    entries = list(
        AuditLogEntry.objects.filter(
            tenant=owner.tenant,
            action__in=["key_renamed", "organisation_renamed", "spend_limit_changed"],
        ).order_by("id")
    )
    # The second rename to the same name changed nothing and left no entry.
    assert [(e.action, e.target, e.details) for e in entries] == [
        ("key_renamed", key.public_id, {"from": "old key name", "to": "ci"}),
        ("organisation_renamed", "Acme Labels", {"from": old_org_name, "to": "Acme Labels"}),
        ("spend_limit_changed", "", {"from": None, "to": "$2.50"}),
        ("spend_limit_changed", "", {"from": "$2.50", "to": None}),
    ]
    assert all(e.actor_id == owner.user.pk for e in entries)
    page = client.get(
        reverse("dashboard:audit", args=[tenant_id]), HTTP_ACCEPT_LANGUAGE="zh-hans"
    ).content.decode()
    for label in ("重命名了 API 密钥", "重命名了组织", "更改了每月支出上限"):
        assert label in page
