"""Schedule maths: crontabs across DST changes, intervals, one-offs, and missed slots."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from django_tasks_q.schedules import (
    GRACE,
    CatchUp,
    Crontab,
    Interval,
    Once,
    check_crontab,
    plan,
    upcoming,
    zone,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
# 2026: Berlin skips 02:00-03:00 on 29 March and repeats 02:00-03:00 on 25 October;
# New York skips 02:00-03:00 on 8 March and repeats 01:00-02:00 on 1 November.
DST_DAYS = [(BERLIN, 3, 29), (BERLIN, 10, 25), (NEW_YORK, 3, 8), (NEW_YORK, 11, 1)]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(tz: ZoneInfo, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=tz, fold=fold).astimezone(UTC)


def slots(schedule: Crontab, start: datetime, end: datetime) -> list[datetime]:
    found = []
    t = start - timedelta(microseconds=1)
    while (t := schedule.next_after(t)) < end:
        found.append(t)
    return found


def cron_oracle(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Cron's DST rules applied minute by minute, with no cleverness: the reference."""
    wildcard = Crontab(expr, tz).wildcard
    fired = []
    u = start
    while u < end:
        here = u.astimezone(tz)
        wall = here.replace(tzinfo=None)
        if croniter.match(expr, wall) and (wildcard or here.fold == 0):
            fired.append(u)
        before = (u - timedelta(minutes=1)).astimezone(tz).replace(tzinfo=None)
        if not wildcard and wall - before > timedelta(minutes=1):  # the clock jumped to `wall`
            skipped = before + timedelta(minutes=1)
            while skipped < wall and u not in fired:
                if croniter.match(expr, skipped):
                    fired.append(u)
                skipped += timedelta(minutes=1)
        u += timedelta(minutes=1)
    return fired


@pytest.mark.parametrize(("tz", "month", "day"), DST_DAYS,
                         ids=[f"{tz.key}-{m:02d}-{d:02d}" for tz, m, d in DST_DAYS])
@pytest.mark.parametrize("expr", ["30 2 * * *", "30 1 * * *", "15,45 2 * * *", "0 3 * * *",
                                  "*/15 * * * *", "30 * * * *", "*/7 1-3 * * *", "59 1 * * *",
                                  "0 */2 * * *", "*/5 * * * *"])
def test_every_slot_of_a_dst_day_matches_crons_rules(expr: str, tz: ZoneInfo, month: int,
                                                      day: int) -> None:
    start = local(tz, 2026, month, day) - timedelta(hours=3)  # the change is at 01:00-03:00
    end = start + timedelta(hours=9)
    assert slots(Crontab(expr, tz), start, end) == cron_oracle(expr, tz, start, end)


def test_a_daily_job_in_the_skipped_hour_runs_once_right_after_the_jump() -> None:
    daily = Crontab("30 2 * * *", BERLIN)
    got = slots(daily, local(BERLIN, 2026, 3, 28), local(BERLIN, 2026, 3, 31))
    assert got == [local(BERLIN, 2026, 3, 28, 2, 30), local(BERLIN, 2026, 3, 29, 3, 0),
                   local(BERLIN, 2026, 3, 30, 2, 30)]
    assert got[1] == utc(2026, 3, 29, 1, 0)
    new_york = slots(Crontab("30 2 * * *", NEW_YORK), local(NEW_YORK, 2026, 3, 8),
                     local(NEW_YORK, 2026, 3, 9))
    assert new_york == [utc(2026, 3, 8, 7, 0)]  # 03:00 EDT


def test_a_daily_job_in_the_repeated_hour_runs_once_the_first_time_round() -> None:
    got = slots(Crontab("30 2 * * *", BERLIN), local(BERLIN, 2026, 10, 24),
                local(BERLIN, 2026, 10, 27))
    assert got == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    new_york = slots(Crontab("30 1 * * *", NEW_YORK), local(NEW_YORK, 2026, 11, 1),
                     local(NEW_YORK, 2026, 11, 2))
    assert new_york == [utc(2026, 11, 1, 5, 30)]  # 01:30 EDT, not again at 01:30 EST


@pytest.mark.parametrize(("tz", "month", "day"), DST_DAYS,
                         ids=[f"{tz.key}-{m:02d}-{d:02d}" for tz, m, d in DST_DAYS])
@pytest.mark.parametrize(("expr", "every"), [("*/15 * * * *", 15), ("30 * * * *", 60),
                                             ("* * * * *", 1)])
def test_jobs_more_frequent_than_daily_keep_their_rhythm(expr: str, every: int, tz: ZoneInfo,
                                                         month: int, day: int) -> None:
    got = slots(Crontab(expr, tz), local(tz, 2026, month, day), local(tz, 2026, month, day, 4))
    gaps = {b - a for a, b in zip(got, got[1:], strict=False)}
    assert gaps == {timedelta(minutes=every)}


def test_from_inside_the_second_pass_of_a_repeated_hour() -> None:
    second_pass = utc(2026, 11, 1, 6, 40)  # 01:40 EST, after 01:40 EDT an hour earlier
    assert Crontab("30 1 * * *", NEW_YORK).next_after(second_pass) == utc(2026, 11, 2, 6, 30)
    assert Crontab("*/15 * * * *", NEW_YORK).next_after(utc(2026, 11, 1, 5, 50)) == utc(
        2026, 11, 1, 6, 0)  # 01:45 EDT, then 01:00 EST


def test_next_after_is_strictly_after_and_reads_the_zone() -> None:
    weekdays = Crontab("0 9 * * 1-5", BERLIN)
    friday_nine = local(BERLIN, 2026, 6, 5, 9)
    assert weekdays.next_after(friday_nine) == local(BERLIN, 2026, 6, 8, 9)  # Monday
    assert weekdays.next_after(friday_nine - timedelta(seconds=1)) == friday_nine
    assert list(upcoming(weekdays, friday_nine, 3)) == [
        local(BERLIN, 2026, 6, d, 9) for d in (8, 9, 10)]
    assert Crontab(" 0  9 * *   1-5 ").expr == "0 9 * * 1-5"


@pytest.mark.parametrize(("expr", "says"), [
    ("0 0 * * * *", "6 field(s)"), ("@daily", "1 field(s)"), ("61 * * * *", "not valid"),
    ("0 0 30 2 *", "never fires"), ("a b c d e", "not valid")])
def test_a_bad_crontab_is_refused_saying_why(expr: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        check_crontab(expr)
    with pytest.raises(ValueError, match=re.escape(says)):
        Crontab(expr)


def test_an_unknown_zone_or_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Base'"):
        zone("Mars/Base")
    assert zone("Europe/Berlin") == BERLIN
    with pytest.raises(ValueError, match="no time zone"):
        Crontab("* * * * *").next_after(datetime(2026, 1, 1))


def test_an_interval_runs_on_the_grid_through_its_anchor() -> None:
    every = Interval(timedelta(minutes=10), utc(2026, 1, 1, 12, 0))
    assert every.next_after(utc(2026, 1, 1, 11, 0)) == utc(2026, 1, 1, 12, 0)
    assert every.next_after(utc(2026, 1, 1, 12, 0)) == utc(2026, 1, 1, 12, 10)
    assert every.next_after(utc(2026, 1, 1, 13, 7, 30)) == utc(2026, 1, 1, 13, 10)
    with pytest.raises(ValueError, match="must be positive"):
        Interval(timedelta(0), utc(2026, 1, 1))


def test_a_one_off_runs_once() -> None:
    once = Once(local(BERLIN, 2026, 5, 1, 8))
    assert once.next_after(utc(2026, 5, 1)) == utc(2026, 5, 1, 6)
    assert once.next_after(utc(2026, 5, 1, 6)) is None
    assert list(upcoming(once, utc(2026, 1, 1), 5)) == [utc(2026, 5, 1, 6)]


def test_a_slot_not_reached_yet_is_waited_for() -> None:
    hourly = Crontab("0 * * * *")
    result = plan(hourly, utc(2026, 1, 1, 10), utc(2026, 1, 1, 9, 59))
    assert (result.fire, result.then) == (None, utc(2026, 1, 1, 10))


@pytest.mark.parametrize("catch_up", list(CatchUp))
def test_a_slot_reached_within_the_grace_is_sent_whatever_the_policy(catch_up: CatchUp) -> None:
    hourly = Crontab("0 * * * *")
    result = plan(hourly, utc(2026, 1, 1, 10), utc(2026, 1, 1, 10) + GRACE, catch_up)
    assert (result.fire, result.then) == (utc(2026, 1, 1, 10), utc(2026, 1, 1, 11))


def test_missed_slots_run_once_or_not_at_all_then_the_schedule_goes_on() -> None:
    hourly = Crontab("0 * * * *")
    missed_since, now = utc(2026, 1, 1, 3), utc(2026, 1, 1, 9, 30)  # six slots missed
    once = plan(hourly, missed_since, now, CatchUp.ONCE)
    assert (once.fire, once.then) == (missed_since, utc(2026, 1, 1, 10))
    skip = plan(hourly, missed_since, now, CatchUp.SKIP)
    assert (skip.fire, skip.then) == (None, utc(2026, 1, 1, 10))
    every = Interval(timedelta(minutes=25), missed_since)
    assert plan(every, missed_since, now).then == utc(2026, 1, 1, 9, 40)


def test_a_one_off_has_nothing_after_it_has_fired() -> None:
    at = utc(2026, 5, 1, 6)
    result = plan(Once(at), at, at + timedelta(seconds=2))
    assert (result.fire, result.then) == (at, None)
