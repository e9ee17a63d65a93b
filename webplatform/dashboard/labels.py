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
    # Audit-log details (webplatform/templatetags/dashboard_format.py)
    gettext_noop("Name"),
    gettext_noop("Access"),
    gettext_noop("Models"),
    gettext_noop("Expires"),
    gettext_noop("Role"),
    gettext_noop("From"),
    gettext_noop("To"),
    gettext_noop("Invited address"),
    gettext_noop("Enabled"),
    gettext_noop("Retention (days)"),
    gettext_noop("Full"),
    gettext_noop("Read only"),
    gettext_noop("Yes"),
    gettext_noop("No"),
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
