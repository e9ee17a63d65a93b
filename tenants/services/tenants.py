"""Plans, tenants, members."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.utils.text import slugify

from tenants.errors import ApplicationError
from tenants.models import DEFAULT_MAX_IMAGE_BYTES, Membership, Plan, Tenant

# The plans every installation starts with. Changing a number here changes it for
# installations that run ``plans_ensure_defaults`` only where the plan does not exist yet:
# an operator's edits in the admin are never overwritten.
DEFAULT_PLANS: dict[str, dict[str, object]] = {
    "free": {
        "requests_per_minute": 20,
        "tokens_per_day": 200_000,
        "concurrent_requests": 2,
        "max_image_bytes": DEFAULT_MAX_IMAGE_BYTES,
        "max_output_tokens": 1024,
    },
    "pro": {
        "requests_per_minute": 600,
        "tokens_per_day": 10_000_000,
        "concurrent_requests": 16,
        "max_image_bytes": 4 * DEFAULT_MAX_IMAGE_BYTES,
        "max_output_tokens": 8192,
        "price_per_month": Decimal("49.00"),
        "price_per_1k_tokens": Decimal("0.00200"),
    },
}


@transaction.atomic
def plans_ensure_defaults() -> list[Plan]:
    """Create the default plans that do not exist yet; return all of them (free, pro)."""
    plans = []
    for name, limits in DEFAULT_PLANS.items():
        plan, _ = Plan.objects.get_or_create(name=name, defaults=limits)
        plans.append(plan)
    return plans


def _unique_slug(name: str) -> str:
    base = slugify(name)[:70] or "tenant"
    slug, suffix = base, 2
    while Tenant.objects.filter(slug=slug).exists():
        slug, suffix = f"{base}-{suffix}", suffix + 1
    return slug


@transaction.atomic
def tenant_create(
    *,
    name: str,
    plan: Plan,
    owner: User | None = None,
    slug: str | None = None,
) -> Tenant:
    """Create an organisation on ``plan``; ``owner`` (if given) becomes its owner member."""
    name = name.strip()
    if not name:
        raise ApplicationError("A tenant name is required.", code="invalid_value", param="name")
    if slug is not None:
        slug = slugify(slug)
        if not slug or Tenant.objects.filter(slug=slug).exists():
            raise ApplicationError(
                f"The slug {slug!r} is empty or taken.", code="invalid_value", param="slug"
            )
    tenant = Tenant.objects.create(name=name, slug=slug or _unique_slug(name), plan=plan)
    if owner is not None:
        membership_create(tenant=tenant, user=owner, role=Membership.Role.OWNER)
    return tenant


@transaction.atomic
def membership_create(
    *, tenant: Tenant, user: User, role: str = Membership.Role.MEMBER
) -> Membership:
    if role not in Membership.Role.values:
        raise ApplicationError(f"Unknown role {role!r}.", code="invalid_value", param="role")
    membership, created = Membership.objects.get_or_create(
        tenant=tenant, user=user, defaults={"role": role}
    )
    if not created and membership.role != role:
        membership.role = role
        membership.save(update_fields=["role"])
    return membership


@dataclass(frozen=True, slots=True)
class EnsuredUser:
    user: User
    created: bool


@transaction.atomic
def user_ensure(*, email: str) -> EnsuredUser:
    """The user with this e-mail, created (username = e-mail, no usable password) if missing."""
    email = get_user_model().objects.normalize_email(email.strip())
    if "@" not in email:
        raise ApplicationError(f"{email!r} is not an e-mail address.", code="invalid_value")
    user_model = get_user_model()
    user = user_model.objects.filter(email__iexact=email).order_by("pk").first()
    if user is not None:
        return EnsuredUser(user=user, created=False)
    user = user_model(username=email, email=email)
    user.set_unusable_password()
    user.save()
    return EnsuredUser(user=user, created=True)
