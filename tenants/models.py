"""Organisations, their members, plans, API keys and usage.

Every tenant-owned row carries ``tenant``; reads go through ``tenants.selectors`` (which take
the tenant) and writes through ``tenants.services``.
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models

DEFAULT_MAX_IMAGE_BYTES = 5 * 1024 * 1024


class Plan(models.Model):
    """Limits a tenant gets unless its own override fields say otherwise."""

    name = models.SlugField(max_length=50, unique=True)
    requests_per_minute = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    tokens_per_day = models.PositiveBigIntegerField(validators=[MinValueValidator(1)])
    concurrent_requests = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    max_image_bytes = models.PositiveIntegerField(
        default=DEFAULT_MAX_IMAGE_BYTES, validators=[MinValueValidator(1)]
    )
    max_output_tokens = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    # Served model names (keys of settings.INFERENCE_MODELS); empty means all of them.
    allowed_models = models.JSONField(default=list, blank=True)
    # Served model to degrade to under load (the chat completions service); empty: none.
    fallback_model = models.CharField(max_length=200, blank=True, default="")
    # The model a request that names none gets: a served model, or "auto" (routing picks
    # the fast or the slow model, webplatform/completions/model_choice.py); empty: the
    # first allowed model.
    default_model = models.CharField(max_length=200, blank=True, default="")
    # Prices, in US dollars: a fixed monthly fee and a price per 1,000 tokens (prompt and
    # completion alike). Zero: free.
    price_per_month = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    price_per_1k_tokens = models.DecimalField(max_digits=10, decimal_places=5, default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Tenant(models.Model):
    """A business (organisation) using the platform."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=80, unique=True)
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="tenants")
    created_at = models.DateTimeField(auto_now_add=True)
    # Whether prompts and answers may be stored with usage (off: only counts are kept).
    log_content = models.BooleanField(default=False)
    # The most this organisation may spend on tokens in a calendar month (UTC), in US
    # dollars, set by an owner; null: no limit. Enforced at admission (429
    # spend_limit_exceeded).
    monthly_spend_limit = models.DecimalField(
        max_digits=12, decimal_places=2, null=True, blank=True
    )

    # Per-tenant overrides of the plan; null means "as the plan says".
    requests_per_minute_override = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    tokens_per_day_override = models.PositiveBigIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    concurrent_requests_override = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    max_image_bytes_override = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )
    max_output_tokens_override = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)]
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique_user_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class ApiKey(models.Model):
    """An API key: ``<prefix>_<public_id>_<secret>``; only an HMAC of the full key is stored."""

    class Access(models.TextChoices):
        READ = "read", "Read only (GET endpoints)"
        FULL = "full", "Full"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    public_id = models.CharField(max_length=32, unique=True)
    # Hex HMAC-SHA256(settings.API_KEY_HMAC_SECRET, full key).
    secret_hash = models.CharField(max_length=64)
    name = models.CharField(max_length=100)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    # Served model names this key may use; empty means whatever the plan allows.
    allowed_models = models.JSONField(default=list, blank=True)
    access = models.CharField(max_length=4, choices=Access.choices, default=Access.FULL)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Written behind, at most once per settings.API_KEY_LAST_USED_RESOLUTION_SECONDS.
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="apikey_tenant_created")]

    def __str__(self) -> str:
        return f"{self.name} ({self.public_id})"


class UsageRecord(models.Model):
    """One request's usage; written once when the request finishes."""

    class Channel(models.TextChoices):
        REST = "rest", "REST"
        WEBSOCKET = "websocket", "WebSocket"
        PLAYGROUND = "playground", "Playground"

    class Status(models.TextChoices):
        OK = "ok", "OK"
        ERROR = "error", "Error"
        CANCELLED = "cancelled", "Cancelled"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage_records")
    api_key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_records"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    request_id = models.CharField(max_length=64, unique=True)
    channel = models.CharField(max_length=10, choices=Channel.choices)
    model = models.CharField(max_length=200)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    image_tokens = models.PositiveIntegerField(default=0)
    image_count = models.PositiveIntegerField(default=0)
    image_bytes = models.PositiveBigIntegerField(default=0)
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    total_latency_ms = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices)
    error_code = models.CharField(max_length=64, blank=True, default="")
    cache_hit = models.BooleanField(default=False)
    # Routing (model "auto"): the rule that picked ``model`` (empty when the request named
    # its model), and, when a fast answer was escalated, the fast model and its tokens
    # (charged too; ``prompt_tokens``/``completion_tokens`` are the answering model's).
    route_rule = models.CharField(max_length=64, blank=True, default="")
    escalated_from = models.CharField(max_length=200, blank=True, default="")
    escalated_prompt_tokens = models.PositiveIntegerField(default=0)
    escalated_completion_tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="usage_tenant_created")]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.tenant_id}, {self.status})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class DailyUsage(models.Model):
    """Per tenant, key and model, one UTC day of ``UsageRecord`` rolled up.

    Rebuilt whole by ``usage_rollup_day`` (delete and insert in one transaction), so a
    rerun of a day is harmless.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="daily_usage")
    api_key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="daily_usage"
    )
    model = models.CharField(max_length=200)
    day = models.DateField()
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    cache_hits = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    image_tokens = models.PositiveBigIntegerField(default=0)
    image_count = models.PositiveBigIntegerField(default=0)
    image_bytes = models.PositiveBigIntegerField(default=0)
    latency_ms_sum = models.PositiveBigIntegerField(default=0)
    time_to_first_token_ms_sum = models.PositiveBigIntegerField(default=0)
    latency_ms_p50 = models.FloatField(null=True, blank=True)
    latency_ms_p95 = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-day", "model"]
        verbose_name_plural = "daily usage"
        indexes = [models.Index(fields=["tenant", "day"], name="dailyusage_tenant_day")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.day} {self.model}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# --- Dashboard: invitations, audit log, content logging --------------------------------


class Invitation(models.Model):
    """An e-mailed invitation to join ``tenant`` with ``role``.

    Only a SHA-256 of the token is stored: the accept link carries the token itself, so a
    database leak does not hand out working invitations.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(
        max_length=10, choices=Membership.Role.choices, default=Membership.Role.MEMBER
    )
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="invitation_tenant_created")]

    def __str__(self) -> str:
        return f"{self.email} to {self.tenant_id} ({self.role})"


class AuditLogEntry(models.Model):
    """One administrative action in an organisation (who did what to what, and when)."""

    class Action(models.TextChoices):
        ORGANISATION_CREATED = "organisation_created", "Organisation created"
        KEY_CREATED = "key_created", "API key created"
        KEY_REVOKED = "key_revoked", "API key revoked"
        KEY_RENAMED = "key_renamed", "API key renamed"
        MEMBER_INVITED = "member_invited", "Member invited"
        INVITATION_CANCELLED = "invitation_cancelled", "Invitation cancelled"
        MEMBER_JOINED = "member_joined", "Member joined"
        MEMBER_REMOVED = "member_removed", "Member removed"
        ROLE_CHANGED = "role_changed", "Role changed"
        PLAN_CHANGED = "plan_changed", "Plan changed"
        ORGANISATION_RENAMED = "organisation_renamed", "Organisation renamed"
        SPEND_LIMIT_CHANGED = "spend_limit_changed", "Monthly spend limit changed"
        CONTENT_LOGGING_CHANGED = "content_logging_changed", "Content logging changed"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="audit_log")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    action = models.CharField(max_length=32, choices=Action.choices)
    # What the action was about, readable without joins (an e-mail, a key's public id).
    target = models.CharField(max_length=255, blank=True, default="")
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="audit_tenant_created")]
        verbose_name_plural = "audit log entries"

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.action} {self.target}"


class ContentLoggingPolicy(models.Model):
    """How long stored prompts and answers are kept; ``Tenant.log_content`` turns storing on."""

    tenant = models.OneToOneField(
        Tenant, on_delete=models.CASCADE, related_name="content_logging_policy"
    )
    retention_days = models.PositiveIntegerField(default=30, validators=[MinValueValidator(1)])
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "content logging policies"

    def __str__(self) -> str:
        return f"{self.tenant_id}: {self.retention_days} days"


class ContentLogEntry(models.Model):
    """A request's prompt and answer text, kept only while the organisation logs content."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="content_log")
    request_id = models.CharField(max_length=64)
    prompt = models.TextField(blank=True, default="")
    answer = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "request_id"], name="contentlog_unique_tenant_request"
            )
        ]
        indexes = [models.Index(fields=["expires_at"], name="contentlog_expires")]
        verbose_name_plural = "content log entries"

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.request_id}"
