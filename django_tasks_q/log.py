"""Execution: log records that name the running task (``task_name``, ``task_id``).

Configure it from ``LOGGING``: put ``TaskFilter`` on a handler, and every record that handler
emits carries the task running where it was logged, so a format may use ``%(task_name)s`` and
``%(task_id)s``. ``TaskFormatter`` is what ``taskworker`` logs with when the project configured
no handler: records from inside a task are prefixed with ``name[id]:``.
"""

from __future__ import annotations

import logging

from .execute import current_request

#: ``task_name`` and ``task_id`` of records logged outside a task (as Celery writes them).
NO_TASK = "???"

#: The format of worker lines (and of anything logged outside a task).
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
#: The format of lines logged by a task's own code.
TASK_LOG_FORMAT = ("[%(asctime)s: %(levelname)s/%(processName)s] "
                   "%(task_name)s[%(task_id)s]: %(message)s")


class TaskFilter(logging.Filter):
    """Sets ``task_name`` and ``task_id`` on each record: the task running where it was
    logged, or ``"???"``. Attributes a record has already (``extra=``) are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Filters run in the thread that logs: the task's own, where its request is current.
        request = current_request()
        if not hasattr(record, "task_name"):
            record.task_name = request.task if request is not None else NO_TASK
        if not hasattr(record, "task_id"):
            record.task_id = (request.id or NO_TASK) if request is not None else NO_TASK
        return True


class TaskFormatter(logging.Formatter):
    """``fmt`` for records logged outside a task and for the worker's own lines (which name
    the task already); ``task_fmt`` for those logged by a task's code."""

    def __init__(self, fmt: str | None = LOG_FORMAT, task_fmt: str = TASK_LOG_FORMAT,
                 datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        self._in_task = logging.Formatter(task_fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        TaskFilter().filter(record)
        inside = getattr(record, "task_id", NO_TASK) != NO_TASK
        if inside and not record.name.startswith("django_tasks_q"):
            return self._in_task.format(record)
        return super().format(record)


def get_task_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with ``TaskFilter`` on it: its records carry ``task_name``
    and ``task_id`` to every handler, whatever the handler's own filters."""
    logger = logging.getLogger(name)
    if not any(isinstance(found, TaskFilter) for found in logger.filters):
        logger.addFilter(TaskFilter())
    return logger
