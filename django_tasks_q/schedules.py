"""Definitions: when a schedule fires next. Pure: no database, no clock of its own.

Every time given to or returned by this module is timezone-aware; results are in UTC.

A crontab is read on the wall clock of its time zone, with cron's rules where that clock jumps:

* When the clock skips an hour (spring), a job at a fixed time inside it runs once, at the first
  instant after the skip; a job whose minute or hour field is a wildcard (``*/15 * * * *``,
  ``30 * * * *``) keeps its rhythm and simply has no slot in the hour that does not exist.
* When the clock repeats an hour (autumn), a job at a fixed time inside it runs once, the first
  time round; a wildcard job keeps its rhythm and runs in both passes.

The calendar maths (which wall-clock minutes a crontab matches) is croniter's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: How near a DST change a time must be for the crontab maths to take it into account.
MARGIN = timedelta(hours=3)
#: How late a slot may be sent and still count as on time (not missed).
GRACE = timedelta(seconds=60)


class CatchUp(StrEnum):
    """What to do with slots missed while no scheduler was running."""

    ONCE = "once"  # run the schedule once for all of them
    SKIP = "skip"  # run nothing for them; wait for the next slot


def zone(name: str) -> ZoneInfo:
    """The time zone ``name`` (an IANA name such as ``Europe/Berlin``); ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as "
                         f"'Europe/Berlin' or 'UTC'") from None


def check_crontab(expr: str) -> str:
    """``expr`` normalised to single spaces; ValueError naming the problem if it is not a valid
    five-field crontab that ever fires."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"crontab {expr!r} has {len(fields)} field(s); it needs five: minute, "
                         f"hour, day of month, month, day of week (e.g. '30 2 * * *')")
    normal = " ".join(fields)
    from croniter import CroniterBadDateError

    if not _croniter().is_valid(normal):
        raise ValueError(f"crontab {expr!r} is not valid: each field is a number, a range "
                         f"(1-5), a step (*/15), a list (1,15) or *")
    try:
        _croniter()(normal, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"crontab {expr!r} never fires (no date matches it)") from None
    return normal


def _croniter() -> Any:
    # Imported when first needed: it is slow to import (it runs the ``file`` command to learn
    # whether the interpreter is 32-bit), and a worker without periodic tasks never needs it.
    from croniter import croniter

    return croniter


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError(f"{t!r} has no time zone; schedules work with aware datetimes")
    return t.astimezone(UTC)


@dataclass(frozen=True)
class Crontab:
    """A five-field crontab read on the wall clock of ``tz``."""

    expr: str
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "expr", check_crontab(self.expr))

    @property
    def wildcard(self) -> bool:
        """True when the minute or hour field is a wildcard: cron keeps such a job's rhythm
        across DST changes rather than its wall-clock times."""
        minute, hour = self.expr.split()[:2]
        return minute.startswith("*") or hour.startswith("*")

    def next_after(self, t: datetime) -> datetime:
        """The first slot strictly after ``t``."""
        t = _utc(t)
        wall = self._wall(t)
        candidate = self._instant(_croniter()(self.expr, wall).get_next(datetime))
        shift = max(self._shift(t), self._shift(candidate))
        if not shift:
            return candidate
        # Near a DST change the order of wall-clock times is not the order of instants: look
        # at every match from ``shift`` before t until no later match can come earlier.
        best: datetime | None = None
        times = _croniter()(self.expr, wall - shift)
        while True:
            w = times.get_next(datetime)
            if best is not None and w - shift > self._wall(best):
                return best
            for instant in self._instants(w):
                if instant > t and (best is None or instant < best):
                    best = instant

    def _wall(self, t: datetime) -> datetime:
        return t.astimezone(self.tz).replace(tzinfo=None)

    def _instant(self, wall: datetime) -> datetime:
        return wall.replace(tzinfo=self.tz).astimezone(UTC)

    def _shift(self, t: datetime) -> timedelta:
        """How far the wall clock jumps within MARGIN of ``t`` (zero: it does not)."""
        before, after = self._offset(t - MARGIN), self._offset(t + MARGIN)
        return abs(after - before) if before is not None and after is not None else MARGIN

    def _offset(self, t: datetime) -> timedelta | None:
        return t.astimezone(self.tz).utcoffset()

    def _instants(self, wall: datetime) -> list[datetime]:
        """The instants at which the wall-clock time ``wall`` is a slot (cron's DST rules)."""
        first = wall.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.tz, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        if self._wall(first) == wall:  # the hour that repeats: first and second time round
            return [first, second] if self.wildcard else [first]
        # The hour that is skipped: fixed-time jobs run as soon as the clock has jumped.
        return [] if self.wildcard else [self._jump(second, first)]

    def _jump(self, before: datetime, after: datetime) -> datetime:
        """The instant the UTC offset changes, between ``before`` and ``after`` (to the second)."""
        offset = self._offset(before)
        while after - before > timedelta(seconds=1):
            middle = before + (after - before) / 2
            if self._offset(middle) == offset:
                before = middle
            else:
                after = middle
        return after.replace(microsecond=0)


@dataclass(frozen=True)
class Interval:
    """Every ``every``, on the grid of slots through ``anchor``."""

    every: timedelta
    anchor: datetime

    def __post_init__(self) -> None:
        if self.every <= timedelta(0):
            raise ValueError(f"an interval must be positive, not {self.every}")
        object.__setattr__(self, "anchor", _utc(self.anchor))

    def next_after(self, t: datetime) -> datetime:
        """The first slot strictly after ``t``."""
        t = _utc(t)
        if t < self.anchor:
            return self.anchor
        return self.anchor + ((t - self.anchor) // self.every + 1) * self.every


@dataclass(frozen=True)
class Once:
    """A single slot at ``at``."""

    at: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", _utc(self.at))

    def next_after(self, t: datetime) -> datetime | None:
        """``at`` if it is after ``t``, else None: a one-off has nothing more to run."""
        return self.at if self.at > _utc(t) else None


Schedule = Crontab | Interval | Once


def describe(schedule: Schedule, tz: ZoneInfo) -> str:
    """The schedule in words; times of day on the clock of ``tz`` (a crontab's own zone wins)."""
    if isinstance(schedule, Crontab):
        # Its translations cost a worker memory and start-up time for words only the admin
        # shows: loaded on first use.
        from cron_descriptor import ExpressionDescriptor, Options

        options = Options()
        options.use_24hour_time_format = True
        words = ExpressionDescriptor(schedule.expr, options).get_description()
        return f"{words} ({schedule.tz.key})"
    if isinstance(schedule, Interval):
        return f"Every {_duration(schedule.every)}"
    return f"Once, at {schedule.at.astimezone(tz):%Y-%m-%d %H:%M:%S} ({tz.key})"


def _duration(span: timedelta) -> str:
    """``5 minutes``, ``1 hour 30 minutes``; a lone unit of one is just ``hour``."""
    seconds = int(span.total_seconds())
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append((count, unit))
    if len(parts) == 1 and parts[0][0] == 1:
        return parts[0][1]
    return " ".join(f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts) or "0 seconds"


def upcoming(schedule: Schedule, t: datetime, count: int) -> Iterator[datetime]:
    """The next ``count`` slots after ``t`` (fewer for a one-off)."""
    for _ in range(count):
        following = schedule.next_after(t)
        if following is None:
            return
        yield following
        t = following


@dataclass(frozen=True)
class Plan:
    """What to do about a schedule at some moment: send ``fire`` (a slot), then wait for
    ``then`` (None: nothing more to run)."""

    fire: datetime | None
    then: datetime | None


def plan(schedule: Schedule, next_run: datetime, now: datetime,
         catch_up: CatchUp = CatchUp.ONCE) -> Plan:
    """The plan at ``now`` for a schedule whose next slot was ``next_run``.

    A slot reached within GRACE is on time and sent. Slots reached later were missed (nothing
    was running): with ``CatchUp.ONCE`` the first of them is sent, standing for all of them;
    with ``CatchUp.SKIP`` none is. Either way the schedule then waits for its first slot after
    ``now``, so however long the pause, at most one run makes up for it.
    """
    next_run, now = _utc(next_run), _utc(now)
    if next_run > now:
        return Plan(None, next_run)
    on_time = now - next_run <= GRACE
    fire = next_run if on_time or catch_up == CatchUp.ONCE else None
    return Plan(fire, schedule.next_after(now))
