"""API: a ``django.tasks`` Task as one of ours, so the worker runs it (context, signals, rows)."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
from django.tasks.base import TaskError
from django.tasks.signals import task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

from . import execute, registry
from .conf import RESULT_MODES
from .exceptions import ImproperlyConfigured, TaskNotRegistered
from .message import TaskMessage
from .states import TaskState
from .task import Task, parse_rate

if TYPE_CHECKING:
    from typing import TypeAlias

    from django.tasks.base import Task as DjangoTaskBase

    from .models import TaskResult as ResultRow
    from .results import AsyncResult

    # Generic in the type stubs only.
    DjangoTask: TypeAlias = DjangoTaskBase[..., Any]
    DjangoResult: TypeAlias = TaskResult[..., Any]

BACKEND_HEADER = registry.DJANGO_TASK_HEADER
PRIORITY_HEADER = "django_task_priority"
ENQUEUED_HEADER = "django_task_enqueued_at"

#: Our task options a ``django.tasks`` task may set: through ``@task(...)`` on Django 6.1,
#: or for every task of a backend through its ``OPTIONS``.
OPTIONS = ("max_retries", "autoretry_for", "retry_backoff", "retry_backoff_max", "retry_jitter",
           "default_retry_delay", "time_limit", "soft_time_limit", "acks_late", "rate_limit",
           "expires", "results")

#: How a stored state reads as Django's status (a custom ``update_state`` state: RUNNING).
STATUSES: dict[str, TaskResultStatus] = {
    TaskState.PENDING: TaskResultStatus.READY,
    TaskState.RETRY: TaskResultStatus.READY,
    TaskState.STARTED: TaskResultStatus.RUNNING,
    TaskState.SUCCESS: TaskResultStatus.SUCCESSFUL,
    TaskState.FAILURE: TaskResultStatus.FAILED,
    TaskState.REVOKED: TaskResultStatus.FAILED,
}

# The attempt running in this context: (task id, the TaskResult its signals carry).
_running: ContextVar[tuple[str, DjangoResult] | None] = ContextVar("django_task_running",
                                                                   default=None)


def broker_priority(priority: int) -> int:
    """Django's priority (-100 to 100) as ours (0 to 9), rounded to the nearest step."""
    return ((priority + 100) * 9 + 100) // 200


def _exception_classes(value: Any) -> tuple[type[BaseException], ...]:
    items = (value,) if isinstance(value, (str, type)) else tuple(value)
    found = tuple(import_string(item) if isinstance(item, str) else item for item in items)
    for cls in found:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"autoretry_for: {cls!r} is not an exception class")
    return found


def clean_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Our task options from ``raw`` (unset ones left out); ValueError naming what is wrong."""
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    options = {key: value for key, value in raw.items() if value is not None}
    if options.get("results", "all") not in RESULT_MODES:
        raise ValueError(f"results={options['results']!r} must be 'errors', 'all' or 'none'")
    try:
        if "autoretry_for" in options:  # classes, or their dotted paths (from settings)
            options["autoretry_for"] = _exception_classes(options["autoretry_for"])
        if "rate_limit" in options:
            parse_rate(options["rate_limit"])
    except (ImportError, TypeError, ImproperlyConfigured) as exc:
        raise ValueError(str(exc)) from None
    return options


def plain(value: Any) -> Any:
    """``value`` as Django's results hold it (JSON types), or as it is when it is not JSON."""
    try:
        return normalize_json(value)
    except (TypeError, ValueError):
        return value


def task_error(exc: BaseException, traceback: str) -> TaskError:
    """Django's record of one error."""
    cls = type(exc)
    return TaskError(exception_class_path=f"{cls.__module__}.{cls.__qualname__}",
                     traceback=traceback)


class DjangoTaskAdapter(Task[..., Any]):
    """Runs a ``django.tasks`` Task in our worker, with our options: retries, limits, rows."""

    def __init__(self, django_task: DjangoTask, defaults: Mapping[str, Any],
                 options: Mapping[str, Any]) -> None:
        self.django_task = django_task
        self.defaults = dict(defaults)  # the backend's OPTIONS it was made with
        super().__init__(django_task.func, name=django_task.module_path,
                         **{**defaults, **options})
        # The worker supplies the first argument (the context), as it does ``self`` for a
        # bound task: argument checks (the admin's retry) leave it out likewise.
        self.bind = django_task.takes_context

    def apply_async(self, args: tuple[Any, ...] | list[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        """Send as ours do; the message is marked as a ``django.tasks`` task."""
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault(BACKEND_HEADER, self.django_task.backend)
        return super().apply_async(args, kwargs, headers=headers, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """In the worker, one attempt: the task runs with its context, between Django's
        ``task_started`` and (from the handlers below) ``task_finished``."""
        req = execute.current_request()
        if req is None or req.id is None or req.task != self.name:
            return self.django_task.func(*args, **kwargs)
        now = timezone.now()
        result = TaskResult(
            task=self._task_for(req.headers), id=req.id, status=TaskResultStatus.RUNNING,
            enqueued_at=_time(req.headers.get(ENQUEUED_HEADER)), started_at=now,
            finished_at=None, last_attempted_at=now, args=list(req.args),
            kwargs=dict(req.kwargs), backend=str(req.headers.get(BACKEND_HEADER)
                                                 or self.django_task.backend),
            errors=[], worker_ids=[req.hostname] * (req.retries + 1))
        if execute.mode_for(self) == "all":
            execute.store(self._message(), TaskState.STARTED, worker=req.hostname,
                          date_started=now)
        _running.set((req.id, result))
        task_started.send(sender=_backend_class(result), task_result=result)
        if self.django_task.takes_context:
            args = (TaskContext(task_result=result), *args)
        return self.django_task.func(*args, **kwargs)  # a coroutine for async def: execute runs it

    def _task_for(self, headers: Mapping[str, Any]) -> DjangoTask:
        # The worker's copy of the task, with the priority and backend it was enqueued with.
        changes: dict[str, Any] = {}
        priority, alias = headers.get(PRIORITY_HEADER), headers.get(BACKEND_HEADER)
        if isinstance(priority, int) and priority != self.django_task.priority:
            changes["priority"] = priority
        if isinstance(alias, str) and alias != self.django_task.backend:
            changes["backend"] = alias
        return self.django_task.using(**changes) if changes else self.django_task

    def _message(self) -> TaskMessage:
        req = self.request
        return TaskMessage(id=req.id or "", name=self.name, args=req.args, kwargs=req.kwargs,
                           retries=req.retries, queue=req.queue, priority=req.priority)

    def _finish(self, task_id: str, status: TaskResultStatus, exc: BaseException | None = None,
                einfo: str = "") -> DjangoResult | None:
        running = _running.get()
        if running is None or running[0] != task_id:
            return None  # not run through __call__ (a plain call, or a failed start)
        _running.set(None)
        result = running[1]
        object.__setattr__(result, "status", status)
        if status != TaskResultStatus.READY:
            object.__setattr__(result, "finished_at", timezone.now())
        if exc is not None:
            result.errors.append(task_error(exc, einfo))
        return result

    def on_success(self, retval: Any, task_id: str, args: list[Any],
                   kwargs: dict[str, Any]) -> None:
        """Send ``task_finished`` with SUCCESSFUL and the return value."""
        result = self._finish(task_id, TaskResultStatus.SUCCESSFUL)
        if result is not None:
            object.__setattr__(result, "_return_value", plain(retval))
            task_finished.send(sender=_backend_class(result), task_result=result)

    def on_failure(self, exc: BaseException, task_id: str, args: list[Any],
                   kwargs: dict[str, Any], einfo: str) -> None:
        """Send ``task_finished`` with FAILED and the error."""
        result = self._finish(task_id, TaskResultStatus.FAILED, exc, einfo)
        if result is not None:
            task_finished.send(sender=_backend_class(result), task_result=result)

    def on_retry(self, exc: BaseException, task_id: str, args: list[Any],
                 kwargs: dict[str, Any], einfo: str) -> None:
        """Keep the attempt's error (READY again) and send ``task_finished`` for the attempt."""
        result = self._finish(task_id, TaskResultStatus.READY, exc, einfo)
        if execute.mode_for(self) == "all":
            execute.store(self._message(), TaskState.RETRY, result=execute.exception_info(exc),
                          traceback=einfo, worker=self.request.hostname)
        if result is not None:
            task_finished.send(sender=_backend_class(result), task_result=result)


def _backend_class(result: DjangoResult) -> type[Any]:
    return type(task_backends[result.backend])


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def registered(django_task: DjangoTask) -> DjangoTaskAdapter | None:
    """The adapter registered for ``django_task``'s function, if any (``.using()`` copies of
    a task share the first definition's)."""
    try:
        found = registry.get(django_task.module_path)
    except TaskNotRegistered:
        return None
    if isinstance(found, DjangoTaskAdapter) and found.django_task.func is django_task.func:
        return found
    return None


def register(django_task: DjangoTask, defaults: Mapping[str, Any],
             options: Mapping[str, Any]) -> DjangoTaskAdapter:
    """Register an adapter for ``django_task`` with our ``options`` over the backend's
    ``defaults``; ValueError when one of our tasks has that name."""
    made = DjangoTaskAdapter(django_task, defaults, options)
    registry.register(made)
    return made


def row_error(row: ResultRow) -> TaskError:
    """The error a stored failure, retry or revocation records."""
    info = row.result if isinstance(row.result, dict) else {}
    if row.status == TaskState.REVOKED or "exc_type" not in info:
        reason = info.get("reason") or row.status.lower()
        return TaskError(exception_class_path="django_tasks_q.exceptions.TaskRevokedError",
                         traceback=row.traceback or f"TaskRevokedError: {reason}")
    name = info.get("exc_qualname") or info["exc_type"]
    return TaskError(exception_class_path=f"{info.get('exc_module') or 'builtins'}.{name}",
                     traceback=row.traceback or f"{info['exc_type']}: {info.get('exc_message')}")


def from_row(row: ResultRow, adapter: DjangoTaskAdapter, alias: str) -> DjangoResult:
    """Django's ``TaskResult`` for a stored row. The row keeps the last attempt only: its
    start time, its error, and its worker (once per attempt in ``worker_ids``)."""
    errors = []
    if row.status in (TaskState.FAILURE, TaskState.RETRY, TaskState.REVOKED):
        errors.append(row_error(row))
    result = TaskResult(
        task=adapter.django_task, id=row.task_id,
        status=STATUSES.get(row.status, TaskResultStatus.RUNNING),
        # Written at enqueue only where every result is kept; otherwise the row is younger.
        enqueued_at=row.date_created if execute.mode_for(adapter) == "all" else None,
        started_at=row.date_started, finished_at=row.date_done,
        last_attempted_at=row.date_started, args=row.args, kwargs=row.kwargs, backend=alias,
        errors=errors, worker_ids=[row.worker] * (row.retries + 1) if row.worker else [])
    if row.status == TaskState.SUCCESS:
        object.__setattr__(result, "_return_value", row.result)
    return result
