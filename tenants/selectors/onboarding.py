"""What a new organisation has done of its first steps (the overview's checklist)."""

from __future__ import annotations

from dataclasses import dataclass

from tenants.models import ApiKey, Invitation, Membership, Tenant, UsageRecord


@dataclass(frozen=True, slots=True)
class Onboarding:
    tried_playground: bool
    created_key: bool
    called_api: bool
    invited_someone: bool

    @property
    def done(self) -> bool:
        return self.tried_playground and self.created_key and self.called_api


def onboarding_for_tenant(*, tenant: Tenant) -> Onboarding:
    records = UsageRecord.objects.filter(tenant=tenant)
    return Onboarding(
        tried_playground=records.filter(channel=UsageRecord.Channel.PLAYGROUND).exists(),
        created_key=ApiKey.objects.filter(tenant=tenant).exists(),
        called_api=records.filter(api_key__isnull=False).exists(),
        invited_someone=Membership.objects.filter(tenant=tenant).count() > 1
        or Invitation.objects.filter(tenant=tenant).exists(),
    )
