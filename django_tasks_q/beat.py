"""Processes: taskbeat, which sends each slot of each schedule once, however many run.

Every taskbeat process tries once a second to hold (or renew) one lease row; the one holding it
leads and sends what is due, the others stand by and take over once the leader's lease runs
out. Leading is only a matter of tidiness: what makes a slot go out once is the database. A
slot is sent in one transaction that moves the schedule's ``next_run_at`` on (only if it is
still the one read, and the timetable was not edited meanwhile) and inserts a ``PeriodicRun``
row, unique per schedule and slot, before the message is published; a second sender of the same
slot fails on one or the other and sends nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import client, conf, message, schedules, signals
from .exceptions import EnqueueError
from .models import PeriodicRun, PeriodicTask, SchedulerLease
from .outage import Outage

logger = logging.getLogger("django_tasks_q.beat")

#: Seconds between looks at the schedules: an edit in the admin takes effect within this.
TICK = 1.0
#: Seconds a leader's lease lasts (renewed every tick); a standby takes over once it runs out.
LEASE_SECONDS = 6.0
LEASE_NAME = "taskbeat"
GRACE_SECONDS = schedules.GRACE.total_seconds()


def default_name() -> str:
    """``beat.<pid>@<host>``."""
    return f"beat.{os.getpid()}@{socket.gethostname()}"


#: Schedules every project has; one of the same name in BEAT_SCHEDULE replaces it, and it can
#: be disabled in the admin like any other.
BUILTIN_SCHEDULE: dict[str, dict[str, Any]] = {
    "django_tasks_q.prune-results": {
        "task": "django_tasks_q.prune_results", "schedule": "17 * * * *",
        "description": "Deletes task results older than TASKS_Q RESULT_EXPIRES, in batches."},
}


def sync_code_schedules() -> int:
    """Copy the built-in schedules and ``TASKS_Q["BEAT_SCHEDULE"]`` into the database, marked as
    defined in code; rows defined in code that are no longer there are deleted. Returns how
    many entries there are. Safe while other taskbeats starting at once do the same."""
    entries = {**BUILTIN_SCHEDULE, **conf.get().BEAT_SCHEDULE}
    checked = {name: code_entry(name, entry) for name, entry in entries.items()}
    for name, fields in checked.items():
        try:
            _save_code_schedule(name, dict(fields))
        except IntegrityError:  # created by another taskbeat meanwhile: update that one
            _save_code_schedule(name, dict(fields))
    PeriodicTask.objects.filter(from_code=True).exclude(name__in=list(entries)).delete()
    return len(entries)


def _save_code_schedule(name: str, fields: dict[str, Any]) -> None:
    with transaction.atomic():
        row = PeriodicTask.objects.filter(name=name).first()
        if row is None:
            row = PeriodicTask(name=name)
        else:
            del fields["enabled"]  # disabled in the admin: it stays so across restarts
        for field, value in fields.items():
            setattr(row, field, value)
        row.from_code = True
        row.save()


def code_entry(name: str, entry: Any) -> dict[str, Any]:
    """The ``PeriodicTask`` fields of one ``BEAT_SCHEDULE`` entry; ValueError saying what is
    wrong with it."""
    where = f'TASKS_Q["BEAT_SCHEDULE"][{name!r}]'
    if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
        raise ValueError(f'{where} must be a dict with a "task" (its registered name) and a '
                         f'"schedule"')
    unknown = set(entry) - {"task", "schedule", "args", "kwargs", "queue", "priority",
                            "timezone", "expires", "catch_up", "description"}
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}")
    when = entry.get("schedule")
    fields: dict[str, Any] = {"crontab": "", "interval": None, "run_at": None}
    if isinstance(when, str):
        try:
            fields["crontab"] = schedules.check_crontab(when)
        except ValueError as exc:
            raise ValueError(f'{where}["schedule"]: {exc}') from None
    elif isinstance(when, timedelta):
        fields["interval"] = when
    elif isinstance(when, (int, float)) and not isinstance(when, bool) and when > 0:
        fields["interval"] = timedelta(seconds=when)
    else:
        raise ValueError(f'{where}["schedule"] must be a number of seconds, a timedelta or a '
                         f"five-field crontab string, not {when!r}")
    catch_up = entry.get("catch_up", PeriodicTask.CatchUp.ONCE)
    if catch_up not in PeriodicTask.CatchUp.values:
        raise ValueError(f'{where}["catch_up"] must be "once" or "skip", not {catch_up!r}')
    expires = entry.get("expires")
    if isinstance(expires, (int, float)):
        expires = timedelta(seconds=expires)
    fields.update(task=entry["task"], args=list(entry.get("args", [])),
                  kwargs=dict(entry.get("kwargs", {})), queue=entry.get("queue", ""),
                  priority=entry.get("priority"), timezone=entry.get("timezone", ""),
                  expires=expires, catch_up=catch_up, description=entry.get("description", ""),
                  enabled=True)
    return fields


@dataclass
class Sent:
    """One slot sent."""

    name: str
    slot: datetime
    task_id: str


class Beat:
    """One taskbeat process."""

    def __init__(self, name: str = "", clock: Callable[[], datetime] = timezone.now) -> None:
        self.name = name or default_name()
        self.holder = f"{self.name}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.leading = False
        self._stop = threading.Event()
        self._database = Outage(logger, "The database is reachable again")
        self._broker = Outage(logger, "Sending periodic tasks works again")
        self._announced = False
        self._broken: set[tuple[int, str]] = set()  # (row, problem) already reported

    # -- the process ------------------------------------------------------------------------
    def run(self) -> None:
        """Lead or stand by, once a second, until stopped (SIGTERM, SIGINT)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        signals.beat_init.send(sender=self)
        synced = False
        while not self._stop.is_set():
            try:
                if not synced:  # at start, or once the database is reachable
                    self._sync()
                    synced = True
                if self.lead():
                    self.tick()
                self._database_ok()
            except DatabaseError as exc:
                self._database_failed(exc)
            self._stop.wait(TICK)
        self.resign()
        logger.info("%s stopped", self.name)

    def _sync(self) -> None:
        from_code = sync_code_schedules()
        logger.info("%s ready: %d schedule(s) enabled, %d of them from BEAT_SCHEDULE", self.name,
                    PeriodicTask.objects.filter(enabled=True).count(), from_code)

    def stop(self) -> None:
        """Ask ``run`` to return after the current tick."""
        self._stop.set()

    def _database_failed(self, exc: Exception) -> None:
        self._database.failed("taskbeat cannot use the database (%s: %s); sending nothing "
                              "until it is back", type(exc).__name__, exc)
        self.leading = False

    def _database_ok(self) -> None:
        self._database.ok()

    # -- leading ----------------------------------------------------------------------------
    def lead(self) -> bool:
        """Take or renew the lease; True while this process leads."""
        now = self.clock()
        until = now + timedelta(seconds=LEASE_SECONDS)
        leases = SchedulerLease.objects.filter(name=LEASE_NAME)
        took = leases.filter(Q(holder=self.holder) | Q(expires_at__lt=now)).update(
            holder=self.holder, expires_at=until)
        if not took:
            try:
                with transaction.atomic():
                    SchedulerLease.objects.create(name=LEASE_NAME, holder=self.holder,
                                                  expires_at=until)
                took = 1
            except IntegrityError:  # another process holds it
                took = 0
        leading = bool(took)
        if leading != self.leading or not self._announced:
            self._announced = True
            if leading:
                logger.info("%s leads: it sends the schedules' tasks", self.name)
            else:
                holder = leases.values_list("holder", flat=True).first() or "?"
                logger.info("%s stands by (%s leads)", self.name, holder.rsplit(":", 1)[0])
        self.leading = leading
        return leading

    def resign(self) -> None:
        """Give up the lease at once, so a standby takes over without waiting for it."""
        if self.leading:
            try:
                SchedulerLease.objects.filter(name=LEASE_NAME, holder=self.holder).delete()
            except DatabaseError:
                return  # it runs out by itself
            self.leading = False

    # -- sending ----------------------------------------------------------------------------
    def tick(self) -> list[Sent]:
        """Send every slot that is due now; returns what was sent."""
        now = self.clock()
        sent = []
        due = PeriodicTask.objects.filter(Q(next_run_at__isnull=True) | Q(next_run_at__lte=now),
                                          enabled=True)
        for row in due.order_by("next_run_at", "id"):
            try:
                done = self._tick_one(row, now)
            except EnqueueError as exc:  # nothing was recorded: it goes at the next tick
                self._broker.failed("Could not send the task of periodic task %r (%s); trying "
                                    "again every second", row.name, exc)
                continue
            except (ValueError, TypeError) as exc:  # a row that does not describe a schedule
                self._report(row, str(exc))
                continue
            if done is not None:
                self._broker.ok()
                sent.append(done)
        return sent

    def _report(self, row: PeriodicTask, problem: str) -> None:
        if (row.pk, problem) not in self._broken:
            self._broken.add((row.pk, problem))
            logger.error("Periodic task %r is not run: %s", row.name, problem)

    def _tick_one(self, row: PeriodicTask, now: datetime) -> Sent | None:
        if row.next_run_at is None:
            first = row.first_run(now)
            self._move_on(row, {"next_run_at": first})
            return None
        plan = schedules.plan(row.schedule(), row.next_run_at, now,
                              schedules.CatchUp(row.catch_up))
        if plan.fire is None and plan.then == row.next_run_at:
            return None
        changes: dict[str, Any] = {"next_run_at": plan.then}
        if plan.then is None:
            changes["enabled"] = False  # a one-off that has run
        if plan.fire is None:
            logger.info("Periodic task %r: skipped the runs missed since %s", row.name,
                        f"{row.next_run_at:%Y-%m-%d %H:%M:%S}")
            self._move_on(row, changes)
            return None
        changes.update(last_run_at=now, total_run_count=F("total_run_count") + 1)
        task_id = message.new_id()
        try:
            with transaction.atomic():
                if not self._move_on(row, changes):
                    return None  # edited meanwhile, or sent by another process
                PeriodicRun.objects.create(periodic_task=row, slot=plan.fire, task_id=task_id)
                self._send(row, plan.fire, task_id)
        except IntegrityError:  # this slot went out already: only move on to the next one
            self._move_on(row, {"next_run_at": plan.then})
            return None
        late = (now - plan.fire).total_seconds()
        logger.info("Sent %s[%s] for periodic task %r, slot %s%s", row.task, task_id, row.name,
                    f"{plan.fire:%Y-%m-%d %H:%M:%S}",
                    f" ({late:.0f}s late: a missed run)" if late > GRACE_SECONDS else "")
        return Sent(row.name, plan.fire, task_id)

    def _move_on(self, row: PeriodicTask, changes: dict[str, Any]) -> bool:
        """Apply ``changes`` if the row's timetable is still the one read; True if it was."""
        same = {field: getattr(row, field) for field in PeriodicTask.TIMETABLE}
        return bool(PeriodicTask.objects.filter(pk=row.pk, next_run_at=row.next_run_at, **same)
                    .update(**changes))

    def _send(self, row: PeriodicTask, slot: datetime, task_id: str) -> None:
        msg, body = client.build(
            row.task, None, row.args, row.kwargs, queue=row.queue or None, priority=row.priority,
            expires=slot + row.expires if row.expires else None, task_id=task_id,
            headers={"periodic_task_name": row.name})
        # Published before the transaction commits: if publishing fails, the slot is not
        # recorded and goes out at the next tick.
        client.publish(msg, body, defer=False)
