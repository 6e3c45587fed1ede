"""Definitions: what the database keeps (task outcomes, schedules, embedded-broker messages)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

from . import conf, schedules
from .states import READY_STATES, TaskState

__all__ = ["READY_STATES", "ParkedMessage", "PeriodicRun", "PeriodicTask", "QueueBinding",
           "QueueMessage", "SchedulerLease", "TaskCount", "TaskGroup", "TaskResult", "TaskState",
           "WorkerState"]


class TaskResult(models.Model):
    """The stored outcome of one task: failures always (by default), successes when asked."""

    task_id = models.CharField(max_length=255)  # unique: see Meta.constraints
    task_name = models.CharField(max_length=255)
    status = models.CharField(max_length=20, choices=TaskState.choices,
                              default=TaskState.PENDING)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder,
                              help_text="Return value, or {exc_type, exc_message} on failure.")
    traceback = models.TextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)
    queue = models.CharField(max_length=255, blank=True)
    retries = models.PositiveIntegerField(default=0)
    priority = models.PositiveSmallIntegerField(null=True, blank=True)
    root_id = models.CharField(max_length=255, blank=True, db_default="",
                               help_text="The first task of the workflow this task is part of.")
    parent_id = models.CharField(max_length=255, blank=True, db_default="",
                                 help_text="The task that sent this one (a chain's step before).")
    group_id = models.CharField(max_length=255, blank=True, db_default="",
                                help_text="The group or chord this task is a member of.")
    # Not auto_now_add: the row is written once, when the task is done, with one clock reading.
    date_created = models.DateTimeField(default=timezone.now)
    date_started = models.DateTimeField(null=True, blank=True)
    date_done = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        verbose_name = "task result"
        ordering = ("-date_done", "-id")
        # The admin's list is newest first, whole or narrowed to one status, task or queue:
        # each has an index that serves the first page without sorting the table.
        indexes = [
            models.Index(fields=["status", "-date_done"], name="dtq_result_status_done"),
            models.Index(fields=["task_name", "-date_done"], name="dtq_result_task_done"),
            models.Index(fields=["queue", "-date_done"], name="dtq_result_queue_done"),
            # Ids are looked up whole, never by prefix. Declared here rather than with
            # unique=/db_index= on the fields, which on PostgreSQL would add to each a second
            # index (varchar_pattern_ops, for LIKE) that every stored outcome pays for.
            models.Index(fields=["root_id"], name="dtq_result_root"),
            models.Index(fields=["group_id"], name="dtq_result_group"),
        ]
        constraints = [models.UniqueConstraint(fields=["task_id"], name="dtq_result_task_id")]
        permissions = [("retry_taskresult", "Can retry a task from its stored result")]

    def __str__(self) -> str:
        return f"{self.task_name} {self.task_id} {self.status}"


class TaskGroup(models.Model):
    """A group or chord as sent: its members, and for a chord, its body and how it went."""

    group_id = models.CharField(max_length=255, unique=True)
    size = models.PositiveIntegerField(help_text="How many members it has.")
    task_ids = models.JSONField(default=list, help_text="The members' task ids, in order.")
    canvas = models.JSONField(help_text="The group or chord as it was sent (its signature).")
    body = models.JSONField(null=True, blank=True,
                            help_text="A chord's body: the task that gets the results.")
    body_id = models.CharField(max_length=255, blank=True,
                               help_text="A chord's body: the task id it is sent with.")
    results = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder,
                               help_text="The members' results, as passed to the body.")
    fired_by = models.CharField(max_length=255, blank=True,
                                help_text="The member whose end sent the body (or failed it).")
    date_created = models.DateTimeField(default=timezone.now, db_index=True)
    date_done = models.DateTimeField(null=True, blank=True,
                                     help_text="When a chord's body was sent, or failed.")

    class Meta:
        verbose_name = "task group"
        ordering = ("-date_created", "-id")
        permissions = [("retry_taskgroup", "Can send a group or chord again")]

    def __str__(self) -> str:
        return f"{'chord' if self.body_id else 'group'} {self.group_id}"


def timetable_zone(name: str) -> ZoneInfo:
    """The zone a schedule's times are read in: ``name``, else ``TASKS_Q["TIMEZONE"]``."""
    return schedules.zone(name or conf.get().TIMEZONE)


class PeriodicTask(models.Model):
    """A schedule: a crontab, an interval or a one-off time at which a task is sent."""

    class CatchUp(models.TextChoices):
        ONCE = "once", "run once for all missed slots"
        SKIP = "skip", "skip missed slots"

    name = models.CharField(max_length=200, unique=True)
    task = models.CharField(max_length=255)
    crontab = models.CharField(max_length=120, blank=True,
                               help_text="Five fields: minute hour day-of-month month day-of-week.")
    interval = models.DurationField(null=True, blank=True)
    run_at = models.DateTimeField(null=True, blank=True,
                                  help_text="A one-off: sent once at this time, then disabled.")
    timezone = models.CharField(max_length=64, blank=True,
                                help_text="Zone the crontab is read in; default TASKS_Q TIMEZONE.")
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    queue = models.CharField(max_length=200, blank=True)
    priority = models.PositiveSmallIntegerField(null=True, blank=True)
    expires = models.DurationField(
        null=True, blank=True, help_text="The task is not run if it starts this long after its "
                                         "slot (a worker backlog, or all workers down).")
    catch_up = models.CharField(
        max_length=10, choices=CatchUp.choices, default=CatchUp.ONCE,
        help_text="What happens to slots missed while no scheduler was running.")
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    from_code = models.BooleanField(
        default=False, editable=False,
        help_text="Defined in TASKS_Q BEAT_SCHEDULE: synced from there when taskbeat starts.")
    next_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_run_at = models.DateTimeField(null=True, blank=True, editable=False)
    total_run_count = models.PositiveIntegerField(default=0, editable=False)

    #: The fields that say when it runs: a change to any of them starts its timetable afresh.
    TIMETABLE = ("crontab", "interval", "run_at", "timezone", "enabled")

    class Meta:
        verbose_name = "periodic task"

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save; a new or changed timetable gets its next run worked out again."""
        before = (type(self).objects.filter(pk=self.pk).values(*self.TIMETABLE).first()
                  if self.pk is not None else None)
        if before is None or any(before[f] != getattr(self, f) for f in self.TIMETABLE):
            self.next_run_at = self.first_run(timezone.now()) if self.enabled else None
            fields = kwargs.get("update_fields")
            if fields is not None:
                kwargs["update_fields"] = {*fields, "next_run_at"}
        super().save(*args, **kwargs)

    def schedule(self) -> schedules.Schedule:
        """The schedule this row describes; ValueError naming the problem if it is not one."""
        kind = self._timetable()
        if kind == "crontab":
            return schedules.Crontab(self.crontab, timetable_zone(self.timezone))
        if kind == "interval":
            assert self.interval is not None
            anchor = self.next_run_at or self.first_run(timezone.now())
            assert anchor is not None
            return schedules.Interval(self.interval, anchor)
        assert self.run_at is not None
        return schedules.Once(self.run_at)

    def first_run(self, now: datetime) -> datetime | None:
        """The first slot of a new (or newly changed, or re-enabled) timetable: the next crontab
        time, at once or one interval after the last run, or the one-off time."""
        kind = self._timetable()
        if kind == "interval":
            assert self.interval is not None
            return self.last_run_at + self.interval if self.last_run_at else now
        if kind == "run_at":
            return self.run_at
        return self.schedule().next_after(now)

    def _timetable(self) -> str:
        given = [name for name, value in (("crontab", self.crontab), ("interval", self.interval),
                                          ("run_at", self.run_at)) if value not in ("", None)]
        if len(given) != 1:
            raise ValueError(f"periodic task {self.name!r} needs exactly one of crontab, "
                             f"interval and run_at; it has {', '.join(given) or 'none'}")
        return given[0]


class PeriodicRun(models.Model):
    """One slot of a schedule that was sent: the database holds each slot once, so however many
    schedulers run, none sends a slot twice."""

    periodic_task = models.ForeignKey(PeriodicTask, on_delete=models.CASCADE,
                                      related_name="runs")
    slot = models.DateTimeField()
    task_id = models.CharField(max_length=255)
    sent_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "periodic run"
        constraints = [models.UniqueConstraint(fields=["periodic_task", "slot"],
                                               name="dtq_periodic_slot_once")]
        ordering = ("-slot",)

    def __str__(self) -> str:
        return f"{self.periodic_task_id} at {self.slot:%Y-%m-%d %H:%M:%S}"


class SchedulerLease(models.Model):
    """Which taskbeat process leads: the one whose lease has not run out."""

    name = models.CharField(max_length=100, unique=True)
    holder = models.CharField(max_length=255)
    expires_at = models.DateTimeField()

    class Meta:
        verbose_name = "scheduler lease"

    def __str__(self) -> str:
        return f"{self.name}: {self.holder} until {self.expires_at:%H:%M:%S}"


class WorkerState(models.Model):
    """A worker as its last heartbeat described it: what the dashboard shows."""

    hostname = models.CharField(max_length=255, unique=True)
    pid = models.PositiveIntegerField()
    pool = models.CharField(max_length=20)
    concurrency = models.PositiveIntegerField(help_text="Pool size (the most, with autoscale).")
    queues = models.JSONField(default=list)
    active = models.PositiveIntegerField(default=0, help_text="Tasks running now.")
    processed = models.PositiveBigIntegerField(default=0, help_text="Tasks finished since start.")
    failed = models.PositiveBigIntegerField(default=0, help_text="Of those, failed.")
    started_at = models.DateTimeField()
    last_heartbeat = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True,
                                      help_text="Set by a worker that shut down cleanly.")

    class Meta:
        verbose_name = "worker"

    def __str__(self) -> str:
        return self.hostname


class TaskCount(models.Model):
    """Tasks one worker finished (and of those, failed) in one minute: the dashboard's chart."""

    worker = models.CharField(max_length=255)
    minute = models.DateTimeField(db_index=True)
    processed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name = "task count"
        constraints = [models.UniqueConstraint(fields=["worker", "minute"],
                                               name="dtq_count_worker_minute")]

    def __str__(self) -> str:
        return f"{self.worker} {self.minute:%Y-%m-%d %H:%M}: {self.processed}/{self.failed}"


class QueueMessage(models.Model):
    """One message of the embedded ``django://`` broker, claimed with a lease while in flight."""

    queue = models.CharField(max_length=200)
    payload = models.TextField()
    priority = models.PositiveSmallIntegerField(default=0)
    visible_at = models.DateTimeField(
        help_text="Not delivered before this time: the lease end while claimed.")
    claimed_by = models.CharField(max_length=100, blank=True)
    deliveries = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name = "queued message"
        indexes = [models.Index(fields=["queue", "-priority", "id"], name="dtq_msg_queue_prio")]

    def __str__(self) -> str:
        return f"{self.queue}#{self.pk}"


class ParkedMessage(models.Model):
    """A task message waiting for its ``eta`` here rather than in a worker's memory."""

    queue = models.CharField(max_length=200)
    task_id = models.CharField(max_length=255)
    retries = models.PositiveIntegerField(default=0)
    due_at = models.DateTimeField(db_index=True)
    headers = models.JSONField()
    body = models.TextField(help_text="The message body as received: [args, kwargs, embed].")
    priority = models.PositiveSmallIntegerField(null=True, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=255, blank=True)

    class Meta:
        verbose_name = "parked message"
        constraints = [
            # A message redelivered before its ack (worker crash) is parked once, not twice.
            models.UniqueConstraint(fields=["task_id", "retries"], name="dtq_parked_once"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} due {self.due_at:%Y-%m-%d %H:%M:%S}"


class QueueBinding(models.Model):
    """A binding of the embedded ``django://`` broker, seen by every process that publishes."""

    exchange = models.CharField(max_length=200)
    routing_key = models.CharField(max_length=255, blank=True)
    pattern = models.TextField(blank=True, help_text="Topic exchanges: the routing key as a regex.")
    queue = models.CharField(max_length=200)
    expires = models.FloatField(null=True, blank=True,
                                help_text="x-expires: seconds the queue lasts unused.")
    message_ttl = models.FloatField(null=True, blank=True,
                                    help_text="x-message-ttl: seconds a message lasts unread.")
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True,
                                      help_text="Removed with the queue's messages after this, "
                                                "unless a consumer keeps it alive.")

    class Meta:
        verbose_name = "queue binding"
        constraints = [models.UniqueConstraint(fields=["exchange", "routing_key", "queue"],
                                               name="dtq_binding_once")]
        indexes = [models.Index(fields=["queue"], name="dtq_binding_queue")]

    def __str__(self) -> str:
        return f"{self.exchange}[{self.routing_key}] -> {self.queue}"
