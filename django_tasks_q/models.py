"""Definitions: what the database keeps (task outcomes, schedules, embedded-broker messages)."""

from __future__ import annotations

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

from .states import READY_STATES, TaskState

__all__ = ["READY_STATES", "ParkedMessage", "PeriodicTask", "QueueMessage", "TaskResult",
           "TaskState"]


class TaskResult(models.Model):
    """The stored outcome of one task: failures always (by default), successes when asked."""

    task_id = models.CharField(max_length=255, unique=True)
    task_name = models.CharField(max_length=255, db_index=True)
    status = models.CharField(max_length=20, choices=TaskState.choices,
                              default=TaskState.PENDING, db_index=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder,
                              help_text="Return value, or {exc_type, exc_message} on failure.")
    traceback = models.TextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)
    queue = models.CharField(max_length=255, blank=True)
    retries = models.PositiveIntegerField(default=0)
    # Not auto_now_add: the row is written once, when the task is done, with one clock reading.
    date_created = models.DateTimeField(default=timezone.now)
    date_started = models.DateTimeField(null=True, blank=True)
    date_done = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        verbose_name = "task result"
        ordering = ("-date_done", "-id")

    def __str__(self) -> str:
        return f"{self.task_name} {self.task_id} {self.status}"


class PeriodicTask(models.Model):
    """A schedule: a crontab, an interval or a one-off time at which a task is sent."""

    name = models.CharField(max_length=200, unique=True)
    task = models.CharField(max_length=255)
    crontab = models.CharField(max_length=120, blank=True,
                               help_text="Five fields: minute hour day-of-month month day-of-week.")
    interval = models.DurationField(null=True, blank=True)
    run_at = models.DateTimeField(null=True, blank=True)
    timezone = models.CharField(max_length=64, blank=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    queue = models.CharField(max_length=200, blank=True)
    priority = models.PositiveSmallIntegerField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    total_run_count = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name = "periodic task"

    def __str__(self) -> str:
        return self.name


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
