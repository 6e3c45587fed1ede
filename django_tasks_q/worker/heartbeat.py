"""Processes: the worker's heartbeat: its state and per-minute counts, written to the database
every few seconds (what the admin dashboard shows)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connection, transaction
from django.db.models import Model
from django.utils import timezone

from .. import monitor
from ..models import TaskCount, WorkerState
from .state import Watcher

if TYPE_CHECKING:
    from .consumer import Consumer

#: Seconds between heartbeats; the dashboard counts a worker offline after three missed ones.
HEARTBEAT_INTERVAL = monitor.HEARTBEAT_INTERVAL

_STATE_FIELDS = ["pid", "pool", "concurrency", "queues", "active", "processed", "failed",
                 "started_at", "last_heartbeat", "stopped_at"]


class Heartbeat(Watcher):
    """Writes the worker's ``WorkerState`` row and its recent ``TaskCount`` rows: when the
    consumer connects, every HEARTBEAT_INTERVAL seconds, and (marked stopped) at shutdown.

    Nothing happens per task: the counts come from the consumer's ``Tally``. The writes run on
    the event loop, like the consumer's other database work (a beat is two short statements);
    when the database is down, the consumer's outage log says so once and the next beat tries
    again.
    """

    def __init__(self, consumer: Consumer, pool: str, interval: float = HEARTBEAT_INTERVAL
                 ) -> None:
        self.consumer = consumer
        self.pool = pool  # the pool's kind: prefork, threads or solo
        self.interval = interval
        self._written: dict[int, tuple[int, int]] = {}  # minute -> counts as last written
        self._attached = False

    def attach(self, hub: Any, connection: Any) -> None:
        self._attached = True
        hub.call_repeatedly(self.interval, self.beat)
        self.beat()  # a new worker shows at once, not one interval later

    def beat(self) -> None:
        """Write the worker's state and the minutes whose counts changed since the last beat."""
        self._write(stopped=False)

    def close(self) -> None:
        # A clean shutdown shows as offline at once, with its final counts.
        if self._attached:
            self._write(stopped=True)

    def _write(self, stopped: bool) -> None:
        consumer, tally = self.consumer, self.consumer.tally
        now = timezone.now()
        state = WorkerState(
            hostname=consumer.hostname, pid=os.getpid(), pool=self.pool,
            concurrency=consumer.pool.size, queues=list(consumer.queues),
            active=len(consumer.pool.active()), processed=tally.processed, failed=tally.failed,
            started_at=monitor.at(tally.started_at), last_heartbeat=now,
            stopped_at=now if stopped else None)
        minutes = {minute: (counts[0], counts[1]) for minute, counts in tally.minutes.items()}
        changed = [TaskCount(worker=consumer.hostname, minute=monitor.at(minute),
                             processed=processed, failed=failed)
                   for minute, (processed, failed) in minutes.items()
                   if self._written.get(minute) != (processed, failed)]
        try:
            with transaction.atomic():
                _upsert(WorkerState, [state], ["hostname"], _STATE_FIELDS)
                if changed:
                    _upsert(TaskCount, changed, ["worker", "minute"], ["processed", "failed"])
        except DatabaseError as exc:
            consumer._database_failed("Could not write the worker's heartbeat", exc)
            return
        consumer._database_ok()
        self._written = minutes


def _upsert(model: type[Model], rows: list[Any], unique: list[str], fields: list[str]) -> None:
    """Insert ``rows``, or update ``fields`` of those whose ``unique`` fields exist already:
    one statement where the database can (PostgreSQL, SQLite, MySQL, MariaDB)."""
    features = connection.features
    if features.supports_update_conflicts:
        target = unique if features.supports_update_conflicts_with_target else None
        model._default_manager.bulk_create(rows, update_conflicts=True, unique_fields=target,
                                           update_fields=fields)
        return
    for row in rows:
        model._default_manager.update_or_create(
            defaults={name: getattr(row, name) for name in fields},
            **{name: getattr(row, name) for name in unique})
