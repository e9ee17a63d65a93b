"""API keys: create (shown once), use, scope, expire, revoke (at once, on every process)."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import re
import uuid
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import ApiKey, AuditLogEntry
from tenants.principals import ApiPrincipal
from tenants.services.api_keys import (
    api_key_authenticate,
    api_key_create,
    api_key_create_audited,
    api_key_record_cache_key,
    api_key_revoke,
    api_key_revoke_audited,
    api_key_revoked_cache_key,
    api_key_used_cache_key,
)
from tests.factories import PlanFactory, TenantFactory, api_key_for

pytestmark = pytest.mark.django_db

TWO_MODELS = {
    "glm-4.6v-flash": {"path": "/nonexistent/a"},
    "glm-4.6v": {"path": "/nonexistent/b"},
}


def _auth_error_code(raw_key: str) -> str:
    with pytest.raises(ApplicationError) as caught:
        api_key_authenticate(raw_key=raw_key)
    assert caught.value.status == 401
    return caught.value.code


def test_create_returns_the_key_once_and_stores_only_an_hmac(owner, settings):
    created = api_key_for(owner.tenant, name="ci", created_by=owner.user)

    prefix, public_id, secret = created.raw_key.split("_")
    assert prefix == settings.API_KEY_PREFIX
    assert re.fullmatch(r"[A-Za-z0-9]{12}", public_id)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", secret)
    stored = ApiKey.objects.get(pk=created.api_key.pk)
    assert stored.public_id == public_id
    assert (
        stored.secret_hash
        == hmac.new(
            settings.API_KEY_HMAC_SECRET.encode(), created.raw_key.encode(), hashlib.sha256
        ).hexdigest()
    )
    assert not any(
        secret in str(getattr(stored, field.attname)) for field in ApiKey._meta.concrete_fields
    )
    assert stored.created_by == owner.user


def test_a_key_authenticates_to_its_tenant(owner):
    created = api_key_for(owner.tenant)

    principal = api_key_authenticate(raw_key=created.raw_key)

    assert isinstance(principal, ApiPrincipal)
    assert principal.is_authenticated
    assert principal.tenant == owner.tenant
    assert principal.api_key.pk == created.api_key.pk
    assert principal.limits.requests_per_minute == owner.tenant.plan.requests_per_minute


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_both_headers_are_accepted(owner, api_client_for, header):
    created = api_key_for(owner.tenant)

    response = api_client_for(created.raw_key, header=header).get("/v1/models")

    assert response.status_code == 200


def test_missing_key_is_401_invalid_api_key_saying_how_to_send_one(api_client_for, db):
    response = api_client_for(None).get("/v1/models")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda key: key[:-1] + ("A" if key[-1] != "A" else "B"),  # wrong secret
        lambda key: "pk" + key[key.index("_") :],  # wrong prefix
        lambda key: key.replace("_", "-"),  # malformed
        lambda key: "sk_Unknown12345_" + "x" * 40,  # unknown public id
    ],
    ids=["wrong-secret", "wrong-prefix", "malformed", "unknown-id"],
)
def test_a_wrong_key_is_401_invalid_api_key_over_http(owner, api_client_for, mangle):
    created = api_key_for(owner.tenant)
    wrong = mangle(created.raw_key)

    response = api_client_for(wrong).get("/v1/models")

    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert wrong not in error["message"]  # never echo a key back


def test_empty_bearer_is_invalid_api_key(api_client_for, db):
    client = api_client_for(None)
    client.credentials(HTTP_AUTHORIZATION="Bearer ")

    response = client.get("/v1/models")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_revoked_key_is_401_api_key_revoked(owner, api_client_for):
    created = api_key_for(owner.tenant)
    client = api_client_for(created.raw_key)
    assert client.get("/v1/models").status_code == 200  # the lookup is now cached

    api_key_revoke(api_key=created.api_key)

    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_revoked"
    assert ApiKey.objects.get(pk=created.api_key.pk).revoked_at is not None


def test_expiry_is_checked_on_every_request_even_from_the_cache(owner, api_client_for, monkeypatch):
    expires_at = timezone.now() + timedelta(hours=1)
    created = api_key_for(owner.tenant, expires_at=expires_at)
    client = api_client_for(created.raw_key)
    assert client.get("/v1/models").status_code == 200  # cached, with its expires_at

    later = expires_at + timedelta(seconds=1)
    monkeypatch.setattr(timezone, "now", lambda: later)

    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_expired"


def test_a_read_only_key_may_get_but_not_post(owner, api_client_for, settings):
    settings.ROOT_URLCONF = "tests.webplatform.api.urls_testing"
    read_only = api_key_for(owner.tenant, access=ApiKey.Access.READ)
    full = api_key_for(owner.tenant)

    assert api_client_for(read_only.raw_key).get("/v1/models").status_code == 200
    refused = api_client_for(read_only.raw_key).post("/v1/test/admit", {}, format="json")
    allowed = api_client_for(full.raw_key).post("/v1/test/admit", {}, format="json")

    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_permissions"
    assert allowed.status_code == 200


def test_model_scope_narrows_the_model_list(owner, api_client_for, settings):
    settings.INFERENCE_MODELS = TWO_MODELS
    scoped = api_key_for(owner.tenant, allowed_models=["glm-4.6v"])
    unscoped = api_key_for(owner.tenant)

    scoped_ids = [m["id"] for m in api_client_for(scoped.raw_key).get("/v1/models").json()["data"]]
    all_ids = [m["id"] for m in api_client_for(unscoped.raw_key).get("/v1/models").json()["data"]]
    hidden = api_client_for(scoped.raw_key).get("/v1/models/glm-4.6v-flash")

    assert scoped_ids == ["glm-4.6v"]
    assert all_ids == ["glm-4.6v-flash", "glm-4.6v"]
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"


def test_a_key_cannot_be_scoped_to_a_model_that_is_not_served(owner):
    with pytest.raises(ApplicationError) as caught:
        api_key_create(tenant=owner.tenant, name="x", allowed_models=["gpt-9"])
    assert caught.value.code == "model_not_found"
    assert not ApiKey.objects.filter(tenant=owner.tenant).exists()


def test_a_key_cannot_be_created_already_expired(owner):
    with pytest.raises(ApplicationError) as caught:
        api_key_create(tenant=owner.tenant, name="x", expires_at=timezone.now())
    assert caught.value.param == "expires_at"


def test_cached_lookup_needs_no_query_and_last_used_is_written_once(owner):
    created = api_key_for(owner.tenant)

    with CaptureQueriesContext(connection) as first:
        api_key_authenticate(raw_key=created.raw_key)
    with CaptureQueriesContext(connection) as later:
        for _ in range(5):
            api_key_authenticate(raw_key=created.raw_key)

    assert [q["sql"].split()[0] for q in first.captured_queries] == ["SELECT", "UPDATE"]
    assert later.captured_queries == []
    assert ApiKey.objects.get(pk=created.api_key.pk).last_used_at is not None


def test_last_used_is_written_again_after_the_resolution_period(owner, settings):
    settings.API_KEY_LAST_USED_RESOLUTION_SECONDS = 1
    created = api_key_for(owner.tenant)
    api_key_authenticate(raw_key=created.raw_key)
    first = ApiKey.objects.get(pk=created.api_key.pk).last_used_at

    cache.delete(api_key_used_cache_key(created.api_key.public_id))  # the 1 s gate has lapsed
    with CaptureQueriesContext(connection) as queries:
        api_key_authenticate(raw_key=created.raw_key)

    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["UPDATE"]
    assert ApiKey.objects.get(pk=created.api_key.pk).last_used_at > first


def test_a_stale_record_cached_after_the_revocation_is_still_refused(owner):
    """The race revocation must survive: process A reads the key from the database just
    before the revocation commits and writes that unrevoked record to the shared cache just
    after it (so after the revocation dropped the cached record)."""
    created = api_key_for(owner.tenant)
    api_key_authenticate(raw_key=created.raw_key)
    record_key = api_key_record_cache_key(created.api_key.public_id)
    stale_record = cache.get(record_key)
    assert stale_record is not None and stale_record.revoked_at is None

    api_key_revoke(api_key=created.api_key)
    cache.set(record_key, stale_record, timeout=30)  # process A's late write

    assert _auth_error_code(created.raw_key) == "api_key_revoked"
    # What refuses it is the marker: without it the stale record would have been accepted.
    cache.delete(api_key_revoked_cache_key(created.api_key.public_id))
    assert api_key_authenticate(raw_key=created.raw_key).tenant == owner.tenant


def _authenticate_on_command(raw_key: str, commands, results) -> None:  # type: ignore[no-untyped-def]
    """Child process: authenticate ``raw_key`` each time the parent asks; report the code."""
    while commands.recv() == "auth":
        try:
            api_key_authenticate(raw_key=raw_key)
            results.send("ok")
        except ApplicationError as error:
            results.send(error.code)
    connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_revocation_takes_effect_at_once_in_another_process_that_cached_the_key(settings):
    assert settings.REDIS_URL, "this test is about processes sharing Redis"
    tenant = TenantFactory(plan=PlanFactory())
    created = api_key_for(tenant)
    connections.close_all()  # the child opens its own database connection
    context = multiprocessing.get_context("fork")
    parent_commands, child_commands = context.Pipe()
    child_results, parent_results = context.Pipe()
    child = context.Process(
        target=_authenticate_on_command, args=(created.raw_key, child_commands, child_results)
    )
    child.start()
    try:
        parent_commands.send("auth")
        assert parent_results.recv() == "ok"  # the child has used (and cached) the key

        api_key_revoke(api_key=ApiKey.objects.get(pk=created.api_key.pk))

        parent_commands.send("auth")
        assert parent_results.recv() == "api_key_revoked"
    finally:
        parent_commands.send("stop")
        child.join(timeout=10)
    assert child.exitcode == 0


def test_embedded_mode_same_lifecycle_on_the_process_local_cache(owner, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    created = api_key_for(owner.tenant)

    assert api_key_authenticate(raw_key=created.raw_key).tenant == owner.tenant
    assert cache.get(api_key_record_cache_key(created.api_key.public_id)) is not None  # locmem
    api_key_revoke(api_key=created.api_key)

    assert _auth_error_code(created.raw_key) == "api_key_revoked"


def test_revoking_one_tenants_key_leaves_other_keys_working(owner, outsider):
    mine = api_key_for(owner.tenant)
    theirs = api_key_for(outsider.tenant)

    api_key_revoke(api_key=mine.api_key)

    assert _auth_error_code(mine.raw_key) == "api_key_revoked"
    assert api_key_authenticate(raw_key=theirs.raw_key).tenant == outsider.tenant


# --- from the dashboard: the same change, audited ------------------------------------------


def test_a_member_creating_and_revoking_a_key_leaves_one_audit_entry_each(owner):
    created = api_key_create_audited(
        tenant=owner.tenant,
        name="ci",
        created_by=owner.user,
        allowed_models=[],
        access="read",
        expires_at=None,
    )
    api_key_revoke_audited(api_key=created.api_key, actor=owner.user)
    api_key_revoke_audited(api_key=created.api_key, actor=owner.user)

    entries = AuditLogEntry.objects.filter(tenant=owner.tenant).order_by("id")
    assert [(e.action, e.target, e.actor_id) for e in entries] == [
        ("key_created", created.api_key.public_id, owner.user.pk),
        ("key_revoked", created.api_key.public_id, owner.user.pk),
    ]
    assert entries[0].details["access"] == "read"


# --- unknown key ids: the negative cache ---------------------------------------------------


def _fresh_id() -> str:
    """A public id no key has and no earlier run cached (the cache outlives test runs)."""
    return uuid.uuid4().hex[:12]


def _junk_key(public_id: str, secret: str = "s" * 40) -> str:
    from django.conf import settings

    return f"{settings.API_KEY_PREFIX}_{public_id}_{secret}"


def test_an_unknown_key_id_costs_one_query_then_none(db):
    junk = _junk_key(_fresh_id())

    with CaptureQueriesContext(connection) as first:
        assert _auth_error_code(junk) == "invalid_api_key"
    with CaptureQueriesContext(connection) as later:
        for _ in range(5):
            assert _auth_error_code(junk) == "invalid_api_key"

    assert len(first.captured_queries) == 1
    assert later.captured_queries == []


def test_unknown_and_known_ids_with_wrong_secrets_cost_the_same_work(owner, monkeypatch):
    """Steady state, both answers are one cache read and one HMAC: no query, so timing
    does not tell an existing public id from a made-up one."""
    import tenants.services.api_keys as api_keys

    created = api_key_for(owner.tenant)
    known_wrong = _junk_key(created.api_key.public_id)
    unknown = _junk_key(_fresh_id())
    for raw in (known_wrong, unknown):  # the first lookup of each loads and caches
        _auth_error_code(raw)
    hmacs: list[str] = []
    real_hash = api_keys.api_key_hash
    monkeypatch.setattr(
        api_keys,
        "api_key_hash",
        lambda *, raw_key: hmacs.append(raw_key) or real_hash(raw_key=raw_key),
    )

    for raw in (known_wrong, unknown):
        with CaptureQueriesContext(connection) as queries:
            assert _auth_error_code(raw) == "invalid_api_key"
        assert queries.captured_queries == []
    assert hmacs == [known_wrong, unknown]


def test_a_key_created_with_an_id_cached_as_unknown_works_at_once(owner, monkeypatch):
    import tenants.services.api_keys as api_keys

    public_id = _fresh_id()
    assert _auth_error_code(_junk_key(public_id)) == "invalid_api_key"  # cached as unknown
    real_random = api_keys._random_text
    monkeypatch.setattr(
        api_keys, "_random_text", lambda n: public_id if n == len(public_id) else real_random(n)
    )

    created = api_key_create(tenant=owner.tenant, name="reuses the id")

    assert created.api_key.public_id == public_id
    principal = api_key_authenticate(raw_key=created.raw_key)
    assert principal.tenant == owner.tenant


def test_the_unknown_id_marker_has_its_ttl_and_then_the_id_is_looked_up_again(db, settings):
    from tenants.services.api_keys import api_key_unknown_cache_key

    settings.API_KEY_UNKNOWN_CACHE_SECONDS = 7
    public_id = _fresh_id()
    junk = _junk_key(public_id)
    _auth_error_code(junk)

    marker = api_key_unknown_cache_key(public_id)
    assert cache.get(marker)
    if hasattr(cache, "ttl"):  # django-redis (the suite's Redis): the TTL as set
        assert 0 < cache.ttl(marker) <= 7
    cache.delete(marker)  # as when its TTL has run out
    with CaptureQueriesContext(connection) as queries:
        _auth_error_code(junk)
    assert len(queries.captured_queries) == 1
