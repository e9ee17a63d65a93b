"""Labels the templates translate at run time (``{% translate obj.get_FOO_display %}``).

The models in ``tenants`` keep plain English labels (not marked for translation there);
they are listed here so that ``makemessages`` extracts them into the dashboard's catalogue.
"""

from __future__ import annotations

from django.utils.translation import gettext_noop

MODEL_LABELS = (
    # Membership.Role
    gettext_noop("Owner"),
    gettext_noop("Admin"),
    gettext_noop("Member"),
    # Plan names (the built-in plans; tenants.services.tenants)
    gettext_noop("free"),
    gettext_noop("pro"),
    # UsageRecord.Status and Channel
    gettext_noop("OK"),
    gettext_noop("Error"),
    gettext_noop("Cancelled"),
    gettext_noop("Playground"),
    # AuditLogEntry.Action
    gettext_noop("Organisation created"),
    gettext_noop("API key created"),
    gettext_noop("API key revoked"),
    gettext_noop("Member invited"),
    gettext_noop("Invitation cancelled"),
    gettext_noop("Member joined"),
    gettext_noop("Member removed"),
    gettext_noop("Role changed"),
    gettext_noop("Plan changed"),
    gettext_noop("Content logging changed"),
)
