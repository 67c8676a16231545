"""Cron expressions of schedules (emu.lineage.cron): fields, next fire times, errors naming the field."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from emu.errors import ConfigError
from emu.lineage.cron import next_fire_time, parse_cron, validate_cron

UTC = timezone.utc


def t(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires(expr: str, after: datetime, n: int) -> list[datetime]:
    cron, out = parse_cron(expr), []
    for _ in range(n):
        after = cron.next_after(after)
        out.append(after)
    return out


def test_every_minute_is_strictly_after_and_drops_seconds():
    assert next_fire_time("* * * * *", t(2025, 1, 1, 0, 0, 0)) == t(2025, 1, 1, 0, 1)
    assert next_fire_time("* * * * *", t(2025, 1, 1, 0, 0, 59, 999999)) == t(2025, 1, 1, 0, 1)
    assert next_fire_time("* * * * *", t(2025, 12, 31, 23, 59, 30)) == t(2026, 1, 1, 0, 0)


def test_steps_ranges_and_lists():
    assert fires("*/15 * * * *", t(2025, 3, 1, 10, 7), 4) == [
        t(2025, 3, 1, 10, 15), t(2025, 3, 1, 10, 30), t(2025, 3, 1, 10, 45), t(2025, 3, 1, 11, 0)]
    assert fires("0 9-11 * * *", t(2025, 3, 1, 10, 30), 3) == [
        t(2025, 3, 1, 11, 0), t(2025, 3, 2, 9, 0), t(2025, 3, 2, 10, 0)]
    assert fires("5,35 1,13 * * *", t(2025, 3, 1, 0, 0), 4) == [
        t(2025, 3, 1, 1, 5), t(2025, 3, 1, 1, 35), t(2025, 3, 1, 13, 5), t(2025, 3, 1, 13, 35)]
    # a-b/n and a/n (a to the field's maximum, as robfig/cron reads it)
    assert parse_cron("10-40/10 * * * *").minutes == {10, 20, 30, 40}
    assert parse_cron("50/5 * * * *").minutes == {50, 55}
    # month and weekday names, weekday 7 = Sunday
    cron = parse_cron("0 0 1 jan,JUL MON-FRI")
    assert cron.months == {1, 7} and cron.weekdays == {1, 2, 3, 4, 5}
    assert parse_cron("0 0 * * 5-7").weekdays == {5, 6, 0}


def test_month_boundaries_and_leap_day():
    assert next_fire_time("0 0 31 * *", t(2025, 4, 1)) == t(2025, 5, 31)
    assert next_fire_time("30 12 29 2 *", t(2025, 3, 1)) == t(2028, 2, 29, 12, 30)
    assert next_fire_time("0 0 1 1 *", t(2025, 6, 15)) == t(2026, 1, 1)


def test_six_fields_have_seconds_first_as_kfp():
    cron = parse_cron("*/20 * * * * *")
    assert cron.has_seconds
    assert fires("*/20 * * * * *", t(2025, 1, 1, 0, 0, 5), 4) == [
        t(2025, 1, 1, 0, 0, 20), t(2025, 1, 1, 0, 0, 40), t(2025, 1, 1, 0, 1, 0), t(2025, 1, 1, 0, 1, 20)]
    # KFP's documented daily example: second 0, minute 0, hour 0.
    assert next_fire_time("0 0 0 * * *", t(2025, 1, 1, 0, 0, 0)) == t(2025, 1, 2)
    assert next_fire_time("0 0 0 ? * *", t(2025, 1, 1, 12)) == t(2025, 1, 2)
    assert parse_cron("30 0 0 * * *").matches(t(2025, 1, 1, 0, 0, 30))
    assert not parse_cron("30 0 0 * * *").matches(t(2025, 1, 1, 0, 0, 31))


def test_day_of_month_and_day_of_week_are_ored_when_both_restricted():
    # 2025-06-01 is a Sunday. "13th or any Friday": Fri 6, Fri 13 (both), Fri 20, Fri 27.
    assert [d.day for d in fires("0 0 13 * 5", t(2025, 6, 1), 5)] == [6, 13, 20, 27, 4]
    assert fires("0 0 13 * 5", t(2025, 6, 1), 5)[-1] == t(2025, 7, 4)
    # dom restricted, dow '*': only the 13th. dow restricted, dom '*': only Fridays.
    assert [d.date().isoformat() for d in fires("0 0 13 * *", t(2025, 6, 1), 2)] == ["2025-06-13", "2025-07-13"]
    assert [d.day for d in fires("0 0 * * FRI", t(2025, 6, 1), 3)] == [6, 13, 20]
    # '?' is '*' for the day fields; '*/2' restricts (robfig/cron): odd days OR Sundays.
    assert [d.day for d in fires("0 0 ? * 5", t(2025, 6, 1), 2)] == [6, 13]
    assert [d.day for d in fires("0 0 */2 * 0", t(2025, 6, 1), 5)] == [3, 5, 7, 8, 9]


def test_matches_agrees_with_next_after():
    cron = parse_cron("7 */6 1-7 * MON")
    start = t(2025, 1, 1)
    hits = fires("7 */6 1-7 * MON", start, 50)
    minute, every = start, []
    while minute <= hits[-1]:
        if cron.matches(minute):
            every.append(minute)
        minute += timedelta(minutes=1)
    assert every == hits


def test_macros():
    assert next_fire_time("@hourly", t(2025, 1, 1, 0, 30)) == t(2025, 1, 1, 1)
    assert next_fire_time("@daily", t(2025, 1, 1, 0, 30)) == t(2025, 1, 2)
    assert next_fire_time("@weekly", t(2025, 6, 2)) == t(2025, 6, 8)  # next Sunday
    assert next_fire_time("@monthly", t(2025, 6, 2)) == t(2025, 7, 1)
    assert validate_cron("  @yearly ") == "@yearly"


def test_offsets_are_converted_to_utc_and_naive_is_refused():
    plus2 = timezone(timedelta(hours=2))
    assert next_fire_time("0 * * * *", datetime(2025, 1, 1, 10, 30, tzinfo=plus2)) == t(2025, 1, 1, 9)
    with pytest.raises(ConfigError, match="timezone-aware"):
        next_fire_time("* * * * *", datetime(2025, 1, 1))


@pytest.mark.parametrize("expr, message", [
    ("", "non-empty"),
    ("* * * *", "has 4 fields; expected 5"),
    ("* * * * * * *", "has 7 fields"),
    ("60 * * * *", "minute field '60' has 60, out of range 0-59"),
    ("* 24 * * *", "hour field '24' has 24, out of range 0-23"),
    ("* * 0 * *", "day-of-month field '0' has 0, out of range 1-31"),
    ("* * * 13 *", "month field '13' has 13, out of range 1-12"),
    ("* * * * 8", "day-of-week field '8' has 8, out of range 0-7"),
    ("61 * * * * *", "second field '61'"),
    ("*/0 * * * *", "minute field '*/0' has step '0'"),
    ("5-2 * * * *", "minute field '5-2' has range '5-2' whose start is after its end"),
    ("a * * * *", "minute field 'a' has 'a', not a number"),
    ("1,,2 * * * *", "minute field '1,,2' has an empty list element"),
    ("? * * * *", "minute field '?' uses '?'"),
    ("* * * FOO *", "month field 'FOO'"),
    ("0 0 30 2 *", "day-of-month field '30' never occurs in month field '2'"),
    ("@every 5m", "unknown macro"),
])
def test_invalid_expressions_name_the_field(expr, message):
    with pytest.raises(ConfigError) as excinfo:
        parse_cron(expr)
    assert message in str(excinfo.value)
