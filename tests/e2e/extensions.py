"""End-to-end tests: worker extensions that log their steps (see test_extensions.py)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django_tasks_q.extensions import WorkerExtension

if TYPE_CHECKING:
    from django_tasks_q.worker.main import Worker

logger = logging.getLogger(__name__)


class Step(WorkerExtension):
    """Logs its start and stop, with what it sees of the worker."""

    def start(self, worker: Worker) -> None:
        logger.warning("step %s start: %s, %d pool process(es), %d running", type(self).__name__,
                       worker.hostname, len(worker.pool.pids()), len(worker.active_tasks()))

    def stop(self, worker: Worker) -> None:
        logger.warning("step %s stop: %d running", type(self).__name__,
                       len(worker.active_tasks()))


class First(Step):
    """The first step."""


class Second(Step):
    """The second step."""


class FailsToStart(Step):
    """A step whose start fails."""

    def start(self, worker: Worker) -> None:
        raise RuntimeError("cannot reach the licence server")
