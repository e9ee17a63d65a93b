"""User accounts as the platform reads them."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser


def user_get(*, user_id: int) -> AbstractBaseUser | None:
    """The user with this id, read afresh (active or not); None when there is none."""
    return get_user_model().objects.filter(pk=user_id).first()
