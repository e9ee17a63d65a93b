"""Finding dates in OCR text and saying whether an expiry date has passed.

Formats recognised (separators ``-``, ``/``, ``.`` and spaces are interchangeable where that
is unambiguous):

- year first: ``2025-03-14``, ``2025/03/14``, ``2025.3.14``, compact ``20250314``;
- numeric day and month: ``14/03/2025``, ``14.03.2025``, ``14-03-25``. These are read
  **day first** (the form used on most labels outside the US) unless that is impossible:
  ``03/14/2025`` has no month 14, so it is read month first as 14 March. ``03/04/2025`` is
  therefore 3 April, never 4 March. Two-digit years mean 20YY;
- month names (English, abbreviated or full, any case): ``14 Mar 2025``, ``14-MAR-2025``,
  ``14MAR2025``, ``Mar 14 2025``, ``March 14, 2025``;
- month and year only: ``MAR 2025``, ``03/2025``, ``2025-03``, ``2025年3月``. A label that
  gives only a month means "until the end of that month", so these are read as the last day
  of the month (``month_only`` is set so the answer can say so);
- Chinese: ``2025年3月14日``, ``2025年03月``.

Each date also gets the label printed just before it, if any: expiry labels (``EXP``,
``BB``, ``BBE``, ``Best before``, ``Use by``, ``有效期至``, ``保质期至`` ...) or production labels
(``MFG``, ``PROD``, ``生产日期`` ...). See ``pick_expiry`` for how the expiry date is chosen.
"""

from __future__ import annotations

import calendar
import datetime as dt
import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MIN_YEAR = 1950
MAX_YEAR = 2199


class DateKind(enum.StrEnum):
    EXPIRY = "expiry"
    BEST_BEFORE = "best before"
    USE_BY = "use by"
    PRODUCTION = "production"


@dataclass(frozen=True)
class FoundDate:
    """A date read from text.

    ``date`` is the day the text means; for a month-only date (``month_only``) that is the
    last day of the month. ``source`` is the matched text, ``label`` the kind of date named
    by the label just before it, or ``None``.
    """

    date: dt.date
    source: str
    start: int
    end: int
    month_only: bool = False
    label: DateKind | None = None

    def iso(self) -> str:
        """The date as printed in answers: ``2025-03-14``, or ``2025-03`` when month-only."""
        return self.date.strftime("%Y-%m") if self.month_only else self.date.isoformat()


_MONTHS = {
    "jan": 1,
    "feb": 2,
    "mar": 3,
    "apr": 4,
    "may": 5,
    "jun": 6,
    "jul": 7,
    "aug": 8,
    "sep": 9,
    "oct": 10,
    "nov": 11,
    "dec": 12,
}
_MONTH_NAME = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sept?(?:ember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
# A number must not touch other digits; a month name must not touch other letters.
_NB = r"(?<![0-9])"
_NA = r"(?![0-9])"
_LB = r"(?<![a-z])"
_LA = r"(?![a-z])"
_SEP = r"[-/.]"
_SP = r"[-/. ,]*"
_NO_SEP_BEFORE = r"(?<!\d[-/.])(?<!\d[-/.]\s)"
_NO_SEP_AFTER = r"(?!\s?[-/.]\s?\d)"

_LABELS: tuple[tuple[str, DateKind], ...] = (
    (
        r"best\s*before(?:\s*end)?|best\s*by|\bbbe?(?![a-z])|\bb\.b\.|\bmhd(?![a-z])",
        DateKind.BEST_BEFORE,
    ),
    (r"use\s*(?:by|before)|sell\s*by", DateKind.USE_BY),
    (
        r"\bexp(?:ir[a-z]*|\.)?(?![a-z])(?:\s*date)?|valid\s*(?:until|till|thru|through)"
        r"|有效期至|有效期|保质期至|保质期|到期日期?|截止日期|失效日期|限用日期",
        DateKind.EXPIRY,
    ),
    (
        r"\bmfg|\bmfd|manufactured|\bprod(?:uced|uction)?(?![a-z])|packed|\bpkd"
        r"|生产日期|生产|制造日期",
        DateKind.PRODUCTION,
    ),
)
_LABEL_RE = re.compile(
    "|".join(f"(?P<l{i}>{pattern})" for i, (pattern, _) in enumerate(_LABELS)), re.IGNORECASE
)
# How far before a date its label may stand (a label on the line above still counts).
_LABEL_WINDOW = 40


def _year(text: str) -> int:
    year = int(text)
    return 2000 + year if len(text) == 2 else year


def _make(year: int, month: int, day: int) -> dt.date | None:
    if not MIN_YEAR <= year <= MAX_YEAR:
        return None
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def _end_of_month(year: int, month: int) -> dt.date | None:
    if not 1 <= month <= 12:
        return None
    return _make(year, month, calendar.monthrange(year, month)[1])


def _day_month(first: int, second: int, year: int) -> dt.date | None:
    """Day first unless impossible, then month first (see the module docstring)."""
    return _make(year, second, first) or _make(year, first, second)


def _month(name: str) -> int:
    return _MONTHS[name[:3].lower()]


def _ymd(m: re.Match[str]) -> tuple[dt.date | None, bool]:
    return _make(int(m["y"]), int(m["m"]), int(m["d"])), False


def _ym(m: re.Match[str]) -> tuple[dt.date | None, bool]:
    return _end_of_month(int(m["y"]), int(m["m"])), True


def _numeric_dmy(m: re.Match[str]) -> tuple[dt.date | None, bool]:
    return _day_month(int(m["a"]), int(m["b"]), _year(m["y"])), False


def _named_dmy(m: re.Match[str]) -> tuple[dt.date | None, bool]:
    return _make(_year(m["y"]), _month(m["mon"]), int(m["d"])), False


def _named_my(m: re.Match[str]) -> tuple[dt.date | None, bool]:
    return _end_of_month(int(m["y"]), _month(m["mon"])), True


_Builder = Callable[[re.Match[str]], tuple[dt.date | None, bool]]

# Most specific first; ``find_dates`` resolves overlaps.
_PATTERNS: tuple[tuple[re.Pattern[str], _Builder], ...] = (
    (re.compile(r"(?P<y>\d{4})\s*年\s*(?P<m>\d{1,2})\s*月\s*(?P<d>\d{1,2})\s*[日号]?"), _ymd),
    (re.compile(r"(?P<y>\d{4})\s*年\s*(?P<m>\d{1,2})\s*月(?!\s*\d)"), _ym),
    (
        re.compile(
            rf"{_NB}(?P<y>\d{{4}})\s?(?P<s>{_SEP})\s?(?P<m>\d{{1,2}})\s?(?P=s)\s?(?P<d>\d{{1,2}}){_NA}"
        ),
        _ymd,
    ),
    (
        re.compile(
            rf"{_NB}(?P<a>\d{{1,2}})\s?(?P<s>{_SEP})\s?(?P<b>\d{{1,2}})\s?(?P=s)\s?(?P<y>\d{{4}}|\d{{2}}){_NA}"
        ),
        _numeric_dmy,
    ),
    (
        re.compile(
            rf"{_NB}(?P<d>\d{{1,2}}){_SP}{_LB}(?P<mon>{_MONTH_NAME}){_LA}{_SP}(?P<y>\d{{4}}|\d{{2}}){_NA}",
            re.IGNORECASE,
        ),
        _named_dmy,
    ),
    (
        re.compile(
            rf"{_LB}(?P<mon>{_MONTH_NAME}){_LA}{_SP}(?P<d>\d{{1,2}})(?:st|nd|rd|th)?{_SP}(?P<y>\d{{4}}){_NA}",
            re.IGNORECASE,
        ),
        _named_dmy,
    ),
    (re.compile(rf"{_NB}(?P<y>(?:19|20|21)\d{{2}})(?P<m>[01]\d)(?P<d>[0-3]\d){_NA}"), _ymd),
    (
        re.compile(rf"{_LB}(?P<mon>{_MONTH_NAME}){_LA}{_SP}(?P<y>\d{{4}}){_NA}", re.IGNORECASE),
        _named_my,
    ),
    # Month-year only where no third number is attached: an impossible full date such as
    # 2024-02-30 must not be read as February.
    (re.compile(rf"{_NB}{_NO_SEP_BEFORE}(?P<m>\d{{1,2}})\s?{_SEP}\s?(?P<y>\d{{4}}){_NA}"), _ym),
    (re.compile(rf"{_NB}(?P<y>\d{{4}})\s?{_SEP}\s?(?P<m>\d{{1,2}}){_NA}{_NO_SEP_AFTER}"), _ym),
)


def _label_before(text: str, start: int, floor: int) -> DateKind | None:
    """The kind named by the last label in the few characters before ``start``."""
    window = text[max(floor, start - _LABEL_WINDOW) : start]
    last: DateKind | None = None
    for match in _LABEL_RE.finditer(window):
        for i, (_, kind) in enumerate(_LABELS):
            if match.group(f"l{i}"):
                last = kind
    return last


def find_dates(text: str) -> list[FoundDate]:
    """All dates in ``text``, in reading order, each with the label printed before it.

    Where two patterns match overlapping text, the one starting first wins, then the longer
    one (so ``14 Mar 2025`` is one full date, not the month-only ``Mar 2025``).
    """
    candidates: list[tuple[int, int, dt.date, bool]] = []
    for pattern, build in _PATTERNS:
        for match in pattern.finditer(text):
            date, month_only = build(match)
            if date is not None:
                candidates.append((match.start(), match.end(), date, month_only))
    candidates.sort(key=lambda c: (c[0], -(c[1] - c[0])))

    found: list[FoundDate] = []
    last_end = 0
    for start, end, date, month_only in candidates:
        if start < last_end:
            continue
        label = _label_before(text, start, last_end)
        source = text[start:end].strip()
        found.append(FoundDate(date, source, start, end, month_only, label))
        last_end = end
    return found


_EXPIRY_KINDS = (DateKind.EXPIRY, DateKind.BEST_BEFORE, DateKind.USE_BY)


def pick_expiry(dates: Sequence[FoundDate]) -> FoundDate | None:
    """The date most likely to be the expiry date.

    The first date labelled as an expiry / best-before / use-by date wins. Without such a
    label, the latest date not labelled as a production date: a pack that prints two bare
    dates prints the production date and the later expiry date.
    """
    for found in dates:
        if found.label in _EXPIRY_KINDS:
            return found
    unlabelled = [found for found in dates if found.label is None]
    if not unlabelled:
        return None
    return max(unlabelled, key=lambda found: found.date)


_EXPIRY_QUESTION = re.compile(
    r"expir|\bexp\b|best[\s-]*(?:before|by)|use[\s-]*(?:by|before)|sell[\s-]*by|\bbbe?\b"
    r"|shelf\s*life|still\s+(?:good|ok|okay|safe|valid|fine)|gone\s+off|out\s+of\s+date"
    r"|过期|有效期|保质期|到期|失效",
    re.IGNORECASE,
)


def is_expiry_question(question: str) -> bool:
    """Whether the question asks about an expiry, best-before or use-by date."""
    return _EXPIRY_QUESTION.search(question) is not None


def question_kind(question: str) -> DateKind:
    """Which kind of date the question names, to echo it in the answer."""
    lowered = question.lower()
    if re.search(r"best[\s-]*(?:before|by)|\bbbe?\b", lowered):
        return DateKind.BEST_BEFORE
    if re.search(r"use[\s-]*(?:by|before)|sell[\s-]*by", lowered):
        return DateKind.USE_BY
    return DateKind.EXPIRY


@dataclass(frozen=True)
class Relative:
    """How a date stands to ``today``: ``days`` is negative when it has passed."""

    days: int

    @property
    def passed(self) -> bool:
        return self.days < 0


def relative_to(date: dt.date, today: dt.date) -> Relative:
    """The date against today. A product whose expiry date is today has not expired yet."""
    return Relative((date - today).days)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_relative(rel: Relative, *, chinese: bool = False) -> str:
    """``it has passed (3 days ago)`` / ``it has not passed yet (12 days left)``."""
    if chinese:
        if rel.passed:
            return f"已过期（{-rel.days} 天前）"
        if rel.days == 0:
            return "尚未过期（今天是最后一天）"
        return f"尚未过期（还剩 {rel.days} 天）"
    if rel.passed:
        return f"it has passed ({_plural(-rel.days, 'day')} ago)"
    if rel.days == 0:
        return "it has not passed yet (today is the last day)"
    return f"it has not passed yet ({_plural(rel.days, 'day')} left)"
