"""Numbers, durations and audit details as the dashboard shows them, in the page's language.

Babel (pinned) supplies the locale data (CLDR): thousands separators, unit names ("6 hr",
"6小时"), list patterns. Load with ``{% load dashboard_format %}``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.lists import format_list
from babel.numbers import format_currency, format_decimal
from babel.units import format_unit
from django import template
from django.utils import formats, timezone, translation
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _

register = template.Library()

# The details keys the services record (tenants.services.*), named for people.
DETAIL_LABELS = {
    "name": "Name",
    "access": "Access",
    "models": "Models",
    "expires_at": "Expires",
    "role": "Role",
    "from": "From",
    "to": "To",
    "invited_email": "Invited address",
    "enabled": "Enabled",
    "retention_days": "Retention (days)",
}
# Values that are codes of a choice: shown by their (translated) label.
VALUE_LABELS = {
    "owner": "Owner",
    "admin": "Admin",
    "member": "Member",
    "full": "Full",
    "read": "Read only",
    "free": "free",
    "pro": "pro",
}


def _locale() -> Locale:
    code = translation.to_locale(translation.get_language() or "en")
    try:
        return Locale.parse(code)
    except (ValueError, UnknownLocaleError):
        return Locale.parse("en")


@register.filter
def num(value: Any) -> str:
    """An integer or decimal with the language's grouping: 1,234,567."""
    if value is None or value == "":
        return "—"
    try:
        return str(format_decimal(value, locale=_locale()))
    except (TypeError, ValueError, ArithmeticError):
        return str(value)


@register.filter
def duration_ms(value: Any) -> str:
    """A duration given in milliseconds, for people: "850 ms", "55.9 s", "6 hr 2 min"."""
    if value is None or value == "":
        return "—"
    ms = max(int(value), 0)
    locale = _locale()
    if ms < 1000:
        return str(format_unit(ms, "duration-millisecond", length="short", locale=locale))
    if ms < 60_000:
        return str(
            format_unit(
                ms / 1000, "duration-second", length="short", format="#,##0.0", locale=locale
            )
        )
    hours, rest = divmod(ms // 1000, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = (
        [(hours, "duration-hour"), (minutes, "duration-minute")]
        if hours
        else [(minutes, "duration-minute"), (seconds, "duration-second")]
    )
    units = [
        str(format_unit(amount, unit, length="short", locale=locale))
        for amount, unit in parts
        if amount or unit == parts[0][1]
    ]
    return str(format_list(units, style="unit-narrow", locale=locale))


def _detail_value(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "—"
    if isinstance(value, bool):
        return _("Yes") if value else _("No")
    if isinstance(value, list):
        return ", ".join(_detail_value(v) for v in value)
    if isinstance(value, int):
        return num(value)
    if isinstance(value, str):
        if value in VALUE_LABELS:
            return _(VALUE_LABELS[value])
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
        if moment.tzinfo is not None:
            moment = timezone.localtime(moment)
        return str(formats.date_format(moment, "Y-m-d H:i"))
    return str(value)


@register.filter
def audit_details(details: Any) -> list[tuple[str, str]]:
    """An audit entry's details as (label, value) pairs a person reads: no Python lists, no
    ISO timestamps with microseconds, codes by their translated names."""
    if not isinstance(details, dict):
        return []
    return [
        (_(DETAIL_LABELS[key]) if key in DETAIL_LABELS else key, _detail_value(value))
        for key, value in details.items()
    ]


@register.filter
def local_time(value: Any, seconds: bool = False) -> SafeString | str:
    """A moment as ``<time>``: UTC text for the page (and without JavaScript), which
    common.js rewrites in the viewer's own time zone (``datetime`` keeps the instant)."""
    if not isinstance(value, datetime):
        return "—"
    moment = value.astimezone(UTC) if timezone.is_aware(value) else value
    shown = formats.date_format(moment, "Y-m-d H:i:s" if seconds else "Y-m-d H:i")
    return format_html(
        '<time datetime="{}" data-local-time="{}">{} UTC</time>',
        moment.isoformat(),
        "seconds" if seconds else "minutes",
        shown,
    )


@register.filter
def usd(value: Any) -> str:
    """An amount of US dollars: two decimals, or four below a cent ("$0.0004")."""
    if value is None or value == "":
        return "—"
    amount = Decimal(value)
    pattern = "¤#,##0.00" if amount == 0 or abs(amount) >= Decimal("0.01") else "¤#,##0.0000"
    return str(
        format_currency(amount, "USD", format=pattern, locale=_locale(), currency_digits=False)
    )
