"""Processes: what a worker is doing and has done, told to whoever watches (stats, heartbeats,
events)."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..states import TaskState

if TYPE_CHECKING:
    from .. import execute
    from .pool import Job

#: Minutes of per-minute counts a worker keeps in memory (the heartbeat writes them out).
KEEP_MINUTES = 3


class Watcher:
    """Told of each task on its way through the consumer; the base class does nothing.

    Calls come from the consumer's event loop, one at a time, so a watcher needs no locks; it
    must not block (a slow watcher holds up every task).
    """

    def attach(self, hub: Any, connection: Any) -> None:
        """The consumer (re)connected: ``hub`` is its event loop, ``connection`` the broker's."""

    def received(self, job: Job) -> None:
        """A task message arrived (it may wait for its eta, a free slot or a rate limit)."""

    def started(self, job: Job) -> None:
        """The task was handed to the pool to run."""

    def finished(self, job: Job, outcome: execute.Outcome) -> None:
        """The pool reported the task's outcome (any status, including RETRY and LOST)."""

    def revoked(self, job: Job, terminated: bool) -> None:
        """The task was revoked: dropped before it started, or ``terminated`` while it ran."""

    def stopping(self) -> None:
        """The worker stopped taking work (a warm or cold shutdown began); still connected."""

    def close(self) -> None:
        """The worker is stopping."""


class Tally(Watcher):
    """Counts since the worker started: per task name, in all, and per minute."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.total: Counter[str] = Counter()  # tasks started, by name (Celery's stats "total")
        self.processed = 0  # finished, whatever the outcome
        self.failed = 0
        # minute start (epoch seconds) -> [processed, failed]; only the last few are kept
        self.minutes: dict[int, list[int]] = {}

    def started(self, job: Job) -> None:
        self.total[job.msg.name] += 1

    def finished(self, job: Job, outcome: execute.Outcome) -> None:
        failed = outcome.status == TaskState.FAILURE
        self.processed += 1
        self.failed += failed
        minute = int(time.time()) // 60 * 60
        counts = self.minutes.get(minute)
        if counts is None:
            counts = self.minutes[minute] = [0, 0]
            for old in [m for m in self.minutes if m <= minute - 60 * KEEP_MINUTES]:
                del self.minutes[old]
        counts[0] += 1
        counts[1] += failed
