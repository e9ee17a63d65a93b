"""Operator views of every tenants model. API keys are created with the service (the key is
shown once), never typed into the admin, so the key admin has no add form."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from tenants.models import ApiKey, DailyUsage, Membership, Plan, Tenant, UsageRecord
from tenants.services.api_keys import api_key_revoke

if TYPE_CHECKING:
    # django-stubs makes the admin classes generic in their model; Django's are not
    # subscriptable at run time (nothing here calls django_stubs_ext.monkeypatch), so the
    # parameters exist for mypy only.
    PlanModelAdmin = admin.ModelAdmin[Plan]
    TenantModelAdmin = admin.ModelAdmin[Tenant]
    MembershipModelAdmin = admin.ModelAdmin[Membership]
    MembershipTabularInline = admin.TabularInline[Membership, Tenant]
    ApiKeyModelAdmin = admin.ModelAdmin[ApiKey]
    UsageRecordModelAdmin = admin.ModelAdmin[UsageRecord]
    DailyUsageModelAdmin = admin.ModelAdmin[DailyUsage]
else:
    PlanModelAdmin = TenantModelAdmin = MembershipModelAdmin = admin.ModelAdmin
    ApiKeyModelAdmin = UsageRecordModelAdmin = DailyUsageModelAdmin = admin.ModelAdmin
    MembershipTabularInline = admin.TabularInline


@admin.register(Plan)
class PlanAdmin(PlanModelAdmin):
    list_display = (
        "name",
        "requests_per_minute",
        "tokens_per_day",
        "concurrent_requests",
        "max_image_bytes",
        "max_output_tokens",
        "fallback_model",
        "default_model",
    )
    search_fields = ("name",)


class MembershipInline(MembershipTabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)


@admin.register(Tenant)
class TenantAdmin(TenantModelAdmin):
    list_display = ("name", "slug", "plan", "log_content", "created_at")
    list_filter = ("plan", "log_content")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]
    fieldsets = (
        (None, {"fields": ("name", "slug", "plan", "log_content")}),
        (
            "Overrides of the plan (empty: as the plan says)",
            {
                "fields": (
                    "requests_per_minute_override",
                    "tokens_per_day_override",
                    "concurrent_requests_override",
                    "max_image_bytes_override",
                    "max_output_tokens_override",
                )
            },
        ),
    )


@admin.register(Membership)
class MembershipAdmin(MembershipModelAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__username", "user__email", "tenant__name", "tenant__slug")
    autocomplete_fields = ("user", "tenant")


@admin.register(ApiKey)
class ApiKeyAdmin(ApiKeyModelAdmin):
    list_display: tuple[str, ...] = ("name", "public_id", "tenant", "access", "created_at")
    list_display += ("expires_at", "revoked_at", "last_used_at")
    list_filter = ("access",)
    search_fields = ("name", "public_id", "tenant__name", "tenant__slug")
    readonly_fields = (
        "tenant",
        "public_id",
        "secret_hash",
        "created_by",
        "created_at",
        "revoked_at",
        "last_used_at",
    )
    fields = ("name", "allowed_models", "access", "expires_at", *readonly_fields)
    actions = ["revoke_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke selected API keys")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        keys = list(queryset.filter(revoked_at__isnull=True))
        for api_key in keys:
            api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {len(keys)} key(s).", messages.SUCCESS)


class ReadOnlyAdminMixin:
    """Before a ModelAdmin in the bases: its rows are seen, never added or changed."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdminMixin, UsageRecordModelAdmin):
    list_display: tuple[str, ...] = ("created_at", "tenant", "api_key", "channel", "model")
    list_display += ("status", "prompt_tokens", "completion_tokens", "total_latency_ms")
    list_display += ("cache_hit",)
    list_filter = ("channel", "status", "cache_hit", "model")
    search_fields = ("request_id", "tenant__slug")
    date_hierarchy = "created_at"


@admin.register(DailyUsage)
class DailyUsageAdmin(ReadOnlyAdminMixin, DailyUsageModelAdmin):
    list_display: tuple[str, ...] = ("day", "tenant", "api_key", "model", "requests", "errors")
    list_display += ("prompt_tokens", "completion_tokens", "latency_ms_p50", "latency_ms_p95")
    list_filter = ("model",)
    search_fields = ("tenant__slug",)
    date_hierarchy = "day"
