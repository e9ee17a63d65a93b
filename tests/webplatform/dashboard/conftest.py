"""Dashboard test fixtures: personas with every role, logged-in clients, translations.

Personas (from ``tests/conftest.py``): ``owner`` and ``teammate`` (a member) of Acme,
``outsider`` owning Globex; here also ``org_admin``, an admin of Acme. ``client_for(persona)``
is a Django test client logged in as that persona.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.test import Client

from tenants.models import Membership
from tests.conftest import Persona
from tests.factories import MembershipFactory

LOCALE_DIR = Path(django_settings.BASE_DIR) / "locale"


@pytest.fixture
def org_admin(owner: Persona) -> Persona:
    membership = MembershipFactory(tenant=owner.tenant, role=Membership.Role.ADMIN)
    return Persona(user=membership.user, tenant=owner.tenant, membership=membership)


@pytest.fixture
def client_for() -> Callable[[Persona | None], Client]:
    def make(persona: Persona | None) -> Client:
        client = Client()
        if persona is not None:
            # UserFactory sets an unusable password after saving and does not save it again:
            # reload, so the session's password hash matches the stored user.
            persona.user.refresh_from_db()
            client.force_login(persona.user)
        return client

    return make


@pytest.fixture(autouse=True)
def _fresh_login_counters(settings) -> None:
    """Log-in lock-out counters live in the shared cache; give each test its own keys."""
    import uuid

    settings.CACHES = {
        **settings.CACHES,
        "default": {
            **settings.CACHES["default"],
            "KEY_PREFIX": f"{settings.CACHES['default'].get('KEY_PREFIX', '')}-{uuid.uuid4().hex[:8]}",
        },
    }


@pytest.fixture(scope="session")
def compiled_translations() -> None:
    """Compile ``locale/*/LC_MESSAGES/django.po`` when a ``.mo`` is missing or older.

    ``make`` compiles them at set-up (``manage.py compilemessages``); this keeps a bare
    ``pytest`` run honest after a .po edit. Needs GNU gettext's ``msgfmt``.
    """
    stale = [
        po
        for po in LOCALE_DIR.glob("*/LC_MESSAGES/django.po")
        if not po.with_suffix(".mo").exists()
        or po.with_suffix(".mo").stat().st_mtime < po.stat().st_mtime
    ]
    if stale:
        if shutil.which("msgfmt") is None:
            pytest.fail("msgfmt is missing: apt-get install -y gettext (or run make)")
        call_command(
            "compilemessages",
            locale=["zh_Hans"],
            ignore_patterns=[".venv", "node_modules", "var"],
            verbosity=0,
        )
    from django.utils import translation

    translation.trans_real._translations = {}  # drop catalogues loaded before compiling
