"""Cron expressions for schedules: parse, validate, match, and the next fire time.

Two forms are accepted, the two the platform meets:

- 5 fields, classic cron: ``minute hour day-of-month month day-of-week``
- 6 fields, KFP recurring runs (robfig/cron with seconds): ``second minute hour day-of-month
  month day-of-week``

Each field is ``*``, a number, a range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n`` (``a`` up to
the field's maximum, as robfig/cron reads it), or a comma list of those. Months take ``JAN``..``DEC``
and days of week ``SUN``..``SAT`` (case-insensitive); day-of-week 0 and 7 are both Sunday; ``?``
means ``*`` in the two day fields (KFP examples use it). The macros ``@yearly`` (``@annually``),
``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and ``@hourly`` are accepted.

Day-of-month and day-of-week combine as in cron: when both are restricted a day matches if
*either* matches; when one is unrestricted only the other counts. A field is unrestricted when it
is ``*`` or ``?`` (``*/1`` too); ``*/2`` is a restriction (robfig/cron's reading, which KFP uses;
Vixie cron would treat it as unrestricted).

All times are UTC: ``next_after`` takes and returns timezone-aware datetimes (KFP evaluates
recurring runs in UTC unless its controller is configured otherwise).

No library is used: ``croniter`` is not a platform dependency and this is ~200 lines of well-tested
code (tests/unit/test_cron.py).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from emu.errors import ConfigError

__all__ = ["CronExpr", "parse_cron", "next_fire_time", "validate_cron"]

_MONTHS = {name: i for i, name in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), start=1)}
_DAYS = {name: i for i, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}

#: (name, low, high, names) of each field, seconds first.
_FIELDS = (
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)

_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}

#: Longest gap searched for the next fire time. Feb 29 fires at most 8 years apart (1896 -> 1904,
#: 2096 -> 2104); expressions that can never fire are rejected at parse time, so this only bounds
#: the loop.
_SEARCH_YEARS = 9


@dataclass(frozen=True)
class CronExpr:
    """A parsed cron expression. Sets hold the allowed values of each field (day-of-week 0-6,
    Sunday 0)."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    #: Whether day-of-month / day-of-week were unrestricted (``*`` or ``?``): decides OR semantics.
    days_any: bool
    weekdays_any: bool
    #: Whether the expression had the leading seconds field (6 fields).
    has_seconds: bool

    def matches(self, when: datetime) -> bool:
        """Whether the expression fires at `when` (UTC; seconds ignored for 5-field expressions)."""
        when = _as_utc(when)
        return (self._day_matches(when.year, when.month, when.day) and when.month in self.months
                and when.hour in self.hours and when.minute in self.minutes
                and (not self.has_seconds or when.second in self.seconds))

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after `after`, as an aware UTC datetime (microseconds 0)."""
        t = _as_utc(after).replace(microsecond=0)
        if self.has_seconds:
            t += timedelta(seconds=1)
        else:
            t = t.replace(second=0) + timedelta(minutes=1)
        limit = t.year + _SEARCH_YEARS
        while t.year <= limit:
            if t.month not in self.months:
                t = _first_of_next_month(t)
                continue
            if not self._day_matches(t.year, t.month, t.day):
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minutes:
                t = t.replace(second=0) + timedelta(minutes=1)
                continue
            if self.has_seconds and t.second not in self.seconds:
                t += timedelta(seconds=1)
                continue
            return t
        # Unreachable for parsed expressions (impossible dates are rejected by parse_cron).
        raise ConfigError(f"cron {self.expression!r} does not fire within {_SEARCH_YEARS} years of {after.isoformat()}")

    def _day_matches(self, year: int, month: int, day: int) -> bool:
        dom = day in self.days
        dow = (calendar.weekday(year, month, day) + 1) % 7 in self.weekdays  # Monday=0 -> Sunday=0
        if self.days_any and self.weekdays_any:
            return True
        if self.days_any:
            return dow
        if self.weekdays_any:
            return dom
        return dom or dow


def parse_cron(expression: str) -> CronExpr:
    """Parse a 5- or 6-field cron expression; ConfigError names the field that is wrong."""
    if not isinstance(expression, str) or not expression.strip():
        raise ConfigError(f"cron expression must be a non-empty string, got {expression!r}")
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in _MACROS:
            raise ConfigError(f"cron {expression!r}: unknown macro; use one of {', '.join(sorted(_MACROS))} "
                              f"or 5/6 fields")
        text = _MACROS[text.lower()]
    parts = text.split()
    if len(parts) not in (5, 6):
        raise ConfigError(f"cron {expression!r} has {len(parts)} fields; expected 5 (minute hour day-of-month "
                          f"month day-of-week) or 6 (second first, as KFP recurring runs use)")
    has_seconds = len(parts) == 6
    if not has_seconds:
        parts = ["0", *parts]
    sets, unrestricted = [], []
    for part, (name, low, high, names) in zip(parts, _FIELDS):
        values, any_ = _parse_field(expression, part, name, low, high, names)
        sets.append(values)
        unrestricted.append(any_)
    weekdays = frozenset(d % 7 for d in sets[5])
    cron = CronExpr(expression=expression.strip(), seconds=sets[0], minutes=sets[1], hours=sets[2], days=sets[3],
                    months=sets[4], weekdays=weekdays, days_any=unrestricted[3], weekdays_any=unrestricted[5],
                    has_seconds=has_seconds)
    if cron.weekdays_any and not cron.days_any:
        # Only day-of-month counts: it must exist in one of the months (Feb 29 in leap years).
        longest = max(calendar.monthrange(2024, m)[1] for m in cron.months)
        if min(cron.days) > longest:
            raise ConfigError(f"cron {expression!r}: day-of-month field {parts[3]!r} never occurs in month "
                              f"field {parts[4]!r}, so the schedule would never fire")
    return cron


def validate_cron(expression: str) -> str:
    """The expression, stripped, if it parses; otherwise ConfigError."""
    return parse_cron(expression).expression


def next_fire_time(expression: str, after: datetime) -> datetime:
    """The first time strictly after `after` (aware) at which `expression` fires, in UTC."""
    return parse_cron(expression).next_after(after)


def _parse_field(expression: str, text: str, name: str, low: int, high: int,
                 names: dict[str, int] | None) -> tuple[frozenset[int], bool]:
    def fail(reason: str) -> ConfigError:
        return ConfigError(f"cron {expression!r}: {name} field {text!r} {reason}")

    def number(token: str) -> int:
        if names and token.upper() in names:
            return names[token.upper()]
        if not token.isdigit():
            allowed = f"{low}-{high}" + (f" or {'/'.join(names)}" if names else "")
            raise fail(f"has {token!r}, not a number ({allowed})")
        value = int(token)
        if not low <= value <= high:
            raise fail(f"has {value}, out of range {low}-{high}")
        return value

    values: set[int] = set()
    unrestricted = False
    for item in text.split(","):
        if not item:
            raise fail("has an empty list element")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise fail(f"has step {step_text!r}; a step is a positive integer")
            step = int(step_text)
        if base in ("*", "?"):
            if base == "?" and name not in ("day-of-month", "day-of-week"):
                raise fail("uses '?', which only day-of-month and day-of-week accept")
            start, end = low, high
            if step == 1:
                unrestricted = True
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = number(first), number(last)
            if start > end:
                raise fail(f"has range {base!r} whose start is after its end")
        else:
            start = number(base)
            end = high if slash else start
        values.update(range(start, end + 1, step))
    if name == "day-of-week" and unrestricted:
        values = set(range(0, 7))
    return frozenset(values), unrestricted


def _as_utc(when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ConfigError(f"cron times must be timezone-aware (UTC), got naive {when.isoformat()}")
    return when.astimezone(timezone.utc)


def _first_of_next_month(t: datetime) -> datetime:
    if t.month == 12:
        return t.replace(year=t.year + 1, month=1, day=1, hour=0, minute=0, second=0)
    return t.replace(month=t.month + 1, day=1, hour=0, minute=0, second=0)
