"""Sign-up: a user, their first organisation (on the free plan) and its owner membership."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.utils.translation import gettext as _

from tenants.errors import ApplicationError
from tenants.models import Membership, Tenant
from tenants.selectors.accounts import user_email_taken
from tenants.services.invitations import invitation_accept
from tenants.services.organisations import organisation_create


@dataclass(frozen=True, slots=True)
class SignedUp:
    user: User
    tenant: Tenant


def _user_create(*, email: str, password: str) -> User:
    user_model = get_user_model()
    email = user_model.objects.normalize_email(email.strip())
    if user_email_taken(email=email):
        raise ApplicationError(
            "An account with this e-mail address already exists.",
            code="email_taken",
            param="email",
        )
    user = user_model(username=email, email=email)
    user.set_password(password)
    user.save()
    return user


@transaction.atomic
def account_sign_up_invited(*, token: str, email: str, password: str) -> Membership:
    """Create the user and accept the invitation ``token`` as them: they join the inviting
    organisation and own none of their own. The address must be the invited one (the
    invitation's check; 403 ``invitation_email_mismatch``), else nothing is created."""
    user = _user_create(email=email, password=password)
    return invitation_accept(token=token, user=user)


@transaction.atomic
def account_sign_up(*, email: str, password: str, organisation_name: str) -> SignedUp:
    """Create the user (username = e-mail) and their organisation, which they own.

    The password must already have passed the validators (the form runs them, with the
    user's attributes); this hashes it.
    """
    user = _user_create(email=email, password=password)
    tenant = organisation_create(name=organisation_name, owner=user)
    return SignedUp(user=user, tenant=tenant)


@transaction.atomic
def account_email_change(*, user: User, email: str, password: str) -> User:
    """Change the signed-in ``user``'s e-mail address (also their user name), confirmed by
    their current password (403 ``wrong_password``); 400 ``email_taken`` when another
    account uses it."""
    if not user.check_password(password):
        raise ApplicationError(
            _("The password is not right."), code="wrong_password", status=403, param="password"
        )
    email = get_user_model().objects.normalize_email(email.strip())
    if email.lower() != (user.email or "").lower() and user_email_taken(email=email):
        raise ApplicationError(
            _("An account with this e-mail address already exists."),
            code="email_taken",
            param="email",
        )
    user.email = email
    user.username = email
    user.save(update_fields=["email", "username"])
    return user
