"""Usage split by model: what each served model answered for a tenant, over its records.

Routing (model ``auto``) may answer a request with the slow model after the fast one
answered first (an escalation): the fast answer's tokens are charged too and are counted
here under the fast model, with the number of its answers escalated away.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Q, Sum
from django.utils import timezone

from tenants.models import Tenant, UsageRecord
from tenants.selectors.usage import UsageFilter


@dataclass(slots=True)
class ModelUsage:
    model: str
    requests: int = 0  # answered by this model (any status)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    routed: int = 0  # of ``requests``: chosen by routing (model "auto")
    escalated_away: int = 0  # its answers replaced by the slow model's (tokens counted here)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_by_model_for_tenant(
    *, tenant: Tenant, usage_filter: UsageFilter, days: int, now: datetime | None = None
) -> list[ModelUsage]:
    """Per model, over the last ``days`` days (UTC, today included), busiest first. The
    filter's key applies; its model selects the rows of that model only."""
    now = now or timezone.now()
    since = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    records = UsageRecord.objects.filter(tenant=tenant, created_at__gte=since)
    # The key filter applies to the rows; the model filter picks among the results (an
    # escalated record counts for two models).
    by_key = records.filter(UsageFilter(api_key=usage_filter.api_key).records())
    rows: dict[str, ModelUsage] = {}
    for row in by_key.values("model").annotate(
        requests=Count("id"),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        routed=Count("id", filter=~Q(route_rule="")),
    ):
        rows[row["model"]] = ModelUsage(
            model=row["model"],
            requests=row["requests"],
            prompt_tokens=row["prompt"] or 0,
            completion_tokens=row["completion"] or 0,
            routed=row["routed"],
        )
    for esc in (
        by_key.exclude(escalated_from="")
        .values("escalated_from")
        .annotate(
            n=Count("id"),
            prompt=Sum("escalated_prompt_tokens"),
            completion=Sum("escalated_completion_tokens"),
        )
    ):
        fast = esc["escalated_from"]
        usage = rows.setdefault(fast, ModelUsage(model=fast))
        usage.escalated_away += esc["n"]
        usage.prompt_tokens += esc["prompt"] or 0
        usage.completion_tokens += esc["completion"] or 0
    result = sorted(rows.values(), key=lambda u: (-u.requests - u.escalated_away, u.model))
    if usage_filter.model:
        result = [u for u in result if u.model == usage_filter.model]
    return result
