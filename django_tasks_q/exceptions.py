"""Foundation: the exceptions users catch, under one root ``TasksQError``."""

from __future__ import annotations


class TasksQError(Exception):
    """Root of every exception raised by django-tasks-q."""


class ImproperlyConfigured(TasksQError):
    """A ``TASKS_Q`` setting or task option is wrong."""


class TaskNotRegistered(TasksQError, KeyError):
    """A message names a task this process does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "task not registered"


class SoftTimeLimitExceeded(TasksQError):
    """Raised inside a task when its ``soft_time_limit`` has passed."""


class TimeLimitExceeded(TasksQError):
    """A task ran past its ``time_limit`` and its process was killed."""


class WorkerLostError(TasksQError):
    """The process running a task died before reporting an outcome."""


class TimeoutError(TasksQError):  # noqa: A001 - the public name mirrors Celery's
    """``AsyncResult.get()`` waited longer than its ``timeout``."""


class ResultsNotKept(TasksQError):
    """``AsyncResult.get()`` was asked for a result that is never stored."""


class EnqueueError(TasksQError):
    """A task could not be handed to the broker."""


class ExtensionError(TasksQError):
    """A worker extension could not be created, started or given its consumers: the worker
    stops."""


class Retry(TasksQError):
    """Control flow: the task asked to run again later."""

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: float | None = None) -> None:
        super().__init__(message or "Retry")
        self.exc = exc
        self.when = when


class Reject(TasksQError):
    """Control flow: drop the message (``requeue=False``) or give it back."""

    def __init__(self, reason: str | None = None, requeue: bool = False) -> None:
        super().__init__(reason or "Reject")
        self.reason = reason
        self.requeue = requeue


class MaxRetriesExceededError(TasksQError):
    """``self.retry()`` was called after ``max_retries`` attempts and no ``exc`` was given."""


class TaskRevokedError(TasksQError):
    """The task was revoked or expired before it ran."""


class TaskFailed(TasksQError):
    """A task failed with an exception whose class cannot be rebuilt in this process."""


class ChordError(TasksQError):
    """A chord's body was not run: one of its header tasks failed, was revoked or expired."""
