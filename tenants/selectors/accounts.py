"""User accounts as the platform reads them."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User


def user_email_taken(*, email: str) -> bool:
    """Whether an account already uses ``email``, as its e-mail address or its username."""
    user_model = get_user_model()
    return (
        user_model.objects.filter(email__iexact=email.strip()).exists()
        or user_model.objects.filter(username__iexact=email.strip()).exists()
    )


def user_get(*, user_id: int) -> User | None:
    """The user with this id, read afresh (active or not); None when there is none."""
    return get_user_model().objects.filter(pk=user_id).first()
