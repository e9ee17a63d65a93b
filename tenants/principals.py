"""Who is calling and what they may do: the types authentication and admission hand around.

Plain frozen dataclasses, so a Channels consumer, a DRF view and a service all see the same
thing and none of them can change it by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from tenants.models import ApiKey, Tenant


# The model name that lets routing choose (webplatform/completions/model_choice.py).
AUTO_MODEL = "auto"


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """A tenant's plan with the tenant's overrides applied (see ``tenant_limits_get``).

    ``allowed_models`` is resolved: the plan's list (every served model when the plan's list
    is empty) intersected with the served models, in settings order.
    """

    requests_per_minute: int
    tokens_per_day: int
    concurrent_requests: int
    max_image_bytes: int
    max_output_tokens: int
    allowed_models: tuple[str, ...]
    fallback_model: str | None
    # The plan's model for a request that names none ("auto" lets routing pick); None: the
    # first allowed model.
    default_model: str | None = None


@dataclass(frozen=True, slots=True)
class ApiPrincipal:
    """The caller of an API request: a tenant through one of its API keys, or a member.

    DRF puts it in ``request.user`` (``request.auth`` is the ``ApiKey``). The ``ApiKey`` and
    ``Tenant`` instances may come from the lookup cache: treat them as read-only.
    """

    tenant: Tenant
    limits: EffectiveLimits
    api_key: ApiKey | None = None
    # The member acting (playground); None for API keys.
    user: User | None = None
    access: str = "full"  # ApiKey.Access values: "read" allows GET/HEAD/OPTIONS only
    # The key's own model scope; empty means "whatever the plan allows".
    key_models: tuple[str, ...] = ()

    is_authenticated: ClassVar[bool] = True
    is_anonymous: ClassVar[bool] = False

    @property
    def tenant_id(self) -> int:
        return self.tenant.pk

    @property
    def can_write(self) -> bool:
        return self.access == "full"

    @property
    def default_model(self) -> str | None:
        """The model a request that names none gets: the plan's default model when it is
        ``auto`` or allowed here, else the first one allowed."""
        allowed = self.allowed_models
        planned = self.limits.default_model
        if planned and (planned == AUTO_MODEL or planned in allowed):
            return planned
        return allowed[0] if allowed else None

    @property
    def allowed_models(self) -> tuple[str, ...]:
        """Served models this principal may use: plan (and overrides) and key scope."""
        if not self.key_models:
            return self.limits.allowed_models
        scope = set(self.key_models)
        return tuple(name for name in self.limits.allowed_models if name in scope)
