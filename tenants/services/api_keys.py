"""API keys: create (shown once), revoke (effective at once everywhere), authenticate.

A key reads ``<prefix>_<public id>_<secret>``: ``prefix`` is settings.API_KEY_PREFIX, the
public id and the secret are base62 (letters and digits), so splitting on the last two
underscores is unambiguous even for a prefix with underscores in it. The database keeps
the public id and HMAC-SHA256(settings.API_KEY_HMAC_SECRET, full key), never the key.

Authentication cost per request (Redis in production, one process-local cache embedded):

- one ``get_many`` of the cached key record, the key's revocation marker, its last-used
  gate and the unknown-id marker;
- on a miss, one SELECT (key, tenant and plan) and one ``set``: the record
  (settings.API_KEY_CACHE_SECONDS), or, for an id no key has, the unknown-id marker
  (settings.API_KEY_UNKNOWN_CACHE_SECONDS; creating a key with that id deletes it). Junk
  keys repeated cost no query, and a known id with a wrong secret and an unknown id cost
  the same work (one cache read, one HMAC), so timing does not tell which ids exist;
- the HMAC check, the revoked and expiry checks (expiry is checked on every request);
- when the gate is absent (once per settings.API_KEY_LAST_USED_RESOLUTION_SECONDS per key),
  an ``add`` of the gate, and for the one process that wins it, one UPDATE of
  ``last_used_at``.

Revocation writes ``revoked_at``, sets the revocation marker in the shared cache and drops
the cached record. The marker is what makes revocation immediate: a process that read the
key from the database just before the revocation committed may write its (unrevoked)
record back to the cache just after; every authentication reads the marker along with the
record, so that stale record is refused too.

Members acting in the dashboard call the ``*_audited`` variants: the same change, plus an
audit log entry in the same transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import ApiKey, AuditLogEntry, Tenant
from tenants.outages import outage_raises_store_unavailable
from tenants.principals import ApiPrincipal
from tenants.selectors.tenants import served_model_names, tenant_limits_get
from tenants.services.audit_log import audit_log_record

PUBLIC_ID_LENGTH = 12
SECRET_LENGTH = 40  # ~238 bits
_ALPHABET = string.ascii_letters + string.digits
_KEY_RE = re.compile(
    r"^(?P<prefix>.+)_(?P<public_id>[A-Za-z0-9]{8,32})_(?P<secret>[A-Za-z0-9]{16,128})$"
)
# A revocation marker must outlive any stale cached record (API_KEY_CACHE_SECONDS after its
# write); a day leaves a wide margin and costs a few bytes per revoked key.
_REVOKED_MARKER_SECONDS = 86_400
# Part of the cached record's key: bump it when ApiKey, Tenant or Plan change shape, so a
# deployment never unpickles records cached by the previous code.
_RECORD_FORMAT = 1
# Compared against when no key has the id: the length of a real hash, matching none.
_NO_KEY_HASH = "0" * 64


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    api_key: ApiKey
    raw_key: str  # the full key: show it once, it is not stored anywhere


def _random_text(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def api_key_hash(*, raw_key: str) -> str:
    return hmac.new(
        settings.API_KEY_HMAC_SECRET.encode(), raw_key.encode(), hashlib.sha256
    ).hexdigest()


# The cache layout (keys in the Django cache, so under its KEY_PREFIX):
def api_key_record_cache_key(public_id: str) -> str:
    """The cached ``ApiKey`` (with tenant and plan), for API_KEY_CACHE_SECONDS."""
    return f"api-key:record:v{_RECORD_FORMAT}:{public_id}"


def api_key_revoked_cache_key(public_id: str) -> str:
    """Present once the key is revoked; read by every authentication."""
    return f"api-key:revoked:{public_id}"


def api_key_unknown_cache_key(public_id: str) -> str:
    """Present while no key has this public id (the negative cache)."""
    return f"api-key:unknown:{public_id}"


def api_key_used_cache_key(public_id: str) -> str:
    """The last-used gate: present while ``last_used_at`` is fresh enough."""
    return f"api-key:used:{public_id}"


def _masked(raw_key: str) -> str:
    if len(raw_key) <= 12:
        return "*" * len(raw_key)
    return f"{raw_key[:8]}{'*' * 8}{raw_key[-4:]}"


def _invalid_key(raw_key: str) -> ApplicationError:
    return ApplicationError(
        f"Incorrect API key provided: {_masked(raw_key)}. You can create and manage API keys "
        "in your organisation's dashboard.",
        code="invalid_api_key",
        status=401,
    )


@transaction.atomic
def api_key_create(
    *,
    tenant: Tenant,
    name: str,
    created_by: User | None = None,
    allowed_models: list[str] | tuple[str, ...] = (),
    access: str = ApiKey.Access.FULL,
    expires_at: datetime | None = None,
) -> CreatedApiKey:
    """Create a key for ``tenant``; the returned ``raw_key`` is the only copy of the key.

    ``allowed_models`` narrows the plan's models (empty: the plan's); ``access`` "read"
    allows GET endpoints only.
    """
    name = name.strip()
    if not name or len(name) > 100:
        raise ApplicationError(
            "A key name of 1 to 100 characters is required.", code="invalid_value", param="name"
        )
    if access not in ApiKey.Access.values:
        raise ApplicationError(
            f"access must be one of {', '.join(ApiKey.Access.values)}.",
            code="invalid_value",
            param="access",
        )
    served = served_model_names()
    unknown = [model for model in allowed_models if model not in served]
    if unknown:
        raise ApplicationError(
            f"Unknown model(s) {', '.join(unknown)}; served: {', '.join(served)}.",
            code="model_not_found",
            param="allowed_models",
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise ApplicationError(
            "expires_at must be in the future.", code="invalid_value", param="expires_at"
        )
    public_id = _random_text(PUBLIC_ID_LENGTH)
    raw_key = f"{settings.API_KEY_PREFIX}_{public_id}_{_random_text(SECRET_LENGTH)}"
    # An earlier lookup of this id may have cached it as unknown: forget that now, and
    # again once the key is visible to other connections (a lookup in between would have
    # found no row and cached the marker again).
    unknown_key = api_key_unknown_cache_key(public_id)
    cache.delete(unknown_key)
    transaction.on_commit(lambda: cache.delete(unknown_key))
    api_key = ApiKey.objects.create(
        tenant=tenant,
        public_id=public_id,
        secret_hash=api_key_hash(raw_key=raw_key),
        name=name,
        created_by=created_by,
        allowed_models=list(dict.fromkeys(allowed_models)),
        access=access,
        expires_at=expires_at,
    )
    return CreatedApiKey(api_key=api_key, raw_key=raw_key)


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke ``api_key``; every process refuses it from the next request on.

    The cache marker is written before the transaction commits, not on commit: failing
    closed (a rolled-back revocation still refused for a day) beats a window in which a
    revoked key still works. Revoking a revoked key is a no-op.
    """
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
            revoked_at=api_key.revoked_at
        )
    cache.set(api_key_revoked_cache_key(api_key.public_id), True, timeout=_REVOKED_MARKER_SECONDS)
    cache.delete(api_key_record_cache_key(api_key.public_id))
    return api_key


@transaction.atomic
def api_key_create_audited(
    *,
    tenant: Tenant,
    name: str,
    created_by: User,
    allowed_models: list[str],
    access: str,
    expires_at: datetime | None,
) -> CreatedApiKey:
    """``api_key_create`` by a member (the dashboard), recorded in the audit log."""
    created = api_key_create(
        tenant=tenant,
        name=name,
        created_by=created_by,
        allowed_models=allowed_models,
        access=access,
        expires_at=expires_at,
    )
    audit_log_record(
        tenant=tenant,
        actor=created_by,
        action=AuditLogEntry.Action.KEY_CREATED,
        target=created.api_key.public_id,
        details={
            "name": created.api_key.name,
            "access": access,
            "models": list(allowed_models),
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return created


@transaction.atomic
def api_key_revoke_audited(*, api_key: ApiKey, actor: User) -> ApiKey:
    """``api_key_revoke`` by a member, recorded in the audit log (once: revoking a revoked
    key again records nothing)."""
    already = api_key.revoked_at is not None
    api_key_revoke(api_key=api_key)
    if not already:
        audit_log_record(
            tenant=api_key.tenant,
            actor=actor,
            action=AuditLogEntry.Action.KEY_REVOKED,
            target=api_key.public_id,
            details={"name": api_key.name},
        )
    return api_key


@transaction.atomic
def api_key_rename_audited(*, api_key: ApiKey, name: str, actor: User) -> ApiKey:
    """``api_key_rename`` by a member, recorded in the audit log (not when the name stays)."""
    previous = api_key.name
    api_key = api_key_rename(api_key=api_key, name=name)
    if api_key.name != previous:
        audit_log_record(
            tenant=api_key.tenant,
            actor=actor,
            action=AuditLogEntry.Action.KEY_RENAMED,
            target=api_key.public_id,
            details={"from": previous, "to": api_key.name},
        )
    return api_key


def api_key_rename(*, api_key: ApiKey, name: str) -> ApiKey:
    """Give ``api_key`` a new name (what the dashboard and usage show; the secret stays)."""
    name = name.strip()
    if not name:
        raise ApplicationError("A key needs a name.", code="invalid_value", param="name")
    ApiKey.objects.filter(pk=api_key.pk).update(name=name)
    api_key.name = name
    # Once committed (at once outside a transaction): a lookup between a delete and the
    # commit would cache the old name again.
    record_key = api_key_record_cache_key(api_key.public_id)
    transaction.on_commit(lambda: cache.delete(record_key))
    return api_key


def _api_key_load(public_id: str) -> ApiKey | None:
    return ApiKey.objects.select_related("tenant__plan").filter(public_id=public_id).first()


def _api_key_touch(api_key: ApiKey) -> None:
    """Write ``last_used_at`` behind: of the requests that find the gate absent, the one
    that wins the ``add`` on the shared gate key does the one UPDATE for this period."""
    resolution = settings.API_KEY_LAST_USED_RESOLUTION_SECONDS
    if cache.add(api_key_used_cache_key(api_key.public_id), 1, timeout=resolution):
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=timezone.now())


@outage_raises_store_unavailable
def api_key_authenticate(*, raw_key: str) -> ApiPrincipal:
    """The principal a raw API key stands for, or ApplicationError 401.

    Codes: ``invalid_api_key`` (malformed, unknown or wrong secret), ``api_key_revoked``,
    ``api_key_expired``; a Redis outage raises ``tenants.outages.StoreUnavailable`` (503).
    Synchronous (cache and database); from async code wrap it in
    ``database_sync_to_async``.
    """
    raw_key = raw_key.strip()
    match = _KEY_RE.match(raw_key)
    if match is None or match["prefix"] != settings.API_KEY_PREFIX:
        raise _invalid_key(raw_key)
    public_id = match["public_id"]
    record_key = api_key_record_cache_key(public_id)
    revoked_key = api_key_revoked_cache_key(public_id)
    used_key = api_key_used_cache_key(public_id)
    unknown_key = api_key_unknown_cache_key(public_id)
    cached: dict[str, Any] = cache.get_many([record_key, revoked_key, used_key, unknown_key])
    api_key: ApiKey | None = cached.get(record_key)
    if api_key is None and not cached.get(unknown_key):
        api_key = _api_key_load(public_id)
        if api_key is None:
            cache.set(unknown_key, True, timeout=settings.API_KEY_UNKNOWN_CACHE_SECONDS)
        else:
            cache.set(record_key, api_key, timeout=settings.API_KEY_CACHE_SECONDS)
    # The HMAC is computed and compared for an unknown id too (against a hash no key has),
    # so that answering it costs what a known id with a wrong secret costs.
    expected = api_key.secret_hash if api_key is not None else _NO_KEY_HASH
    if not hmac.compare_digest(expected, api_key_hash(raw_key=raw_key)) or api_key is None:
        raise _invalid_key(raw_key)
    if cached.get(revoked_key) or api_key.revoked_at is not None:
        raise ApplicationError("This API key has been revoked.", code="api_key_revoked", status=401)
    if api_key.expires_at is not None and api_key.expires_at <= timezone.now():
        raise ApplicationError(
            f"This API key expired at {api_key.expires_at.isoformat()}.",
            code="api_key_expired",
            status=401,
        )
    if used_key not in cached:
        _api_key_touch(api_key)
    return ApiPrincipal(
        tenant=api_key.tenant,
        limits=tenant_limits_get(tenant=api_key.tenant),
        api_key=api_key,
        access=api_key.access,
        key_models=tuple(api_key.allowed_models),
    )


def api_key_check_not_revoked(*, api_key: ApiKey) -> None:
    """ApplicationError 401 when ``api_key`` has been revoked or has expired since it was
    authenticated. One cache read (the revocation marker), no database: cheap enough to
    poll while a websocket answer streams."""
    if cache.get(api_key_revoked_cache_key(api_key.public_id)):
        raise ApplicationError("This API key has been revoked.", code="api_key_revoked", status=401)
    if api_key.expires_at is not None and api_key.expires_at <= timezone.now():
        raise ApplicationError("This API key has expired.", code="api_key_expired", status=401)


def api_key_principal_by_id(*, api_key_id: int) -> ApiPrincipal:
    """The principal of a key already proven by its holder (a redeemed websocket ticket).

    Revocation and expiry are checked again: a ticket never outlives its key.
    """
    api_key = ApiKey.objects.select_related("tenant__plan").filter(pk=api_key_id).first()
    if api_key is None:
        raise ApplicationError("This API key no longer exists.", code="invalid_api_key", status=401)
    if cache.get(api_key_revoked_cache_key(api_key.public_id)) or api_key.revoked_at is not None:
        raise ApplicationError("This API key has been revoked.", code="api_key_revoked", status=401)
    if api_key.expires_at is not None and api_key.expires_at <= timezone.now():
        raise ApplicationError("This API key has expired.", code="api_key_expired", status=401)
    return ApiPrincipal(
        tenant=api_key.tenant,
        limits=tenant_limits_get(tenant=api_key.tenant),
        api_key=api_key,
        access=api_key.access,
        key_models=tuple(api_key.allowed_models),
    )
