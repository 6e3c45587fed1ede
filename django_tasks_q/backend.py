"""Surface: ``TasksQBackend``, which runs Django's own ``django.tasks`` on our workers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import django
from django.apps import apps
from django.core import checks
from django.utils import timezone

try:
    from django.tasks import DEFAULT_TASK_QUEUE_NAME, Task, TaskResult, TaskResultStatus
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued
except ImportError as exc:  # Django 5.2: the rest of django_tasks_q works without this module
    raise ImportError(
        f"django_tasks_q.backend is a backend for django.tasks, which Django "
        f"{django.get_version()} does not have: use Django 6.0 or newer, or django_tasks_q's "
        f"own @task") from exc

from . import client, conf, message, registry
from .django_task import (
    BACKEND_HEADER,
    ENQUEUED_HEADER,
    OPTIONS,
    PRIORITY_HEADER,
    STATUSES,
    DjangoTaskAdapter,
    broker_priority,
    clean_options,
    from_row,
    plain,
    register,
    registered,
    task_error,
)
from .exceptions import ResultsNotKept, TaskNotRegistered
from .execute import mode_for
from .states import TaskState

if TYPE_CHECKING:
    from .django_task import DjangoResult, DjangoTask
    from .results import AsyncResult

__all__ = ["ResultNotKept", "TasksQBackend", "TasksQTask"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True, kw_only=True)
class TasksQTask(Task):  # type: ignore[type-arg]  # generic in the type stubs only
    """Django's ``Task`` with our options, given to ``@task(...)`` on Django 6.1; None: unset
    (the backend's ``OPTIONS``, then our defaults, apply)."""

    max_retries: int | None = None
    autoretry_for: tuple[type[BaseException], ...] | None = None
    retry_backoff: bool | float | None = None
    retry_backoff_max: float | None = None
    retry_jitter: bool | None = None
    default_retry_delay: float | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None
    rate_limit: str | None = None
    expires: float | None = None
    results: str | None = None


class ResultNotKept(TaskResultDoesNotExist, ResultsNotKept):
    """``get_result`` found nothing, and this backend does not keep every result."""


class TasksQBackend(BaseTaskBackend):
    """Sends ``django.tasks`` tasks through our client to ``taskworker`` processes."""

    task_class = TasksQTask
    supports_defer = True
    supports_priority = True
    supports_async_task = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        # Without a QUEUES list of its own, the backend takes the queues TASKS_Q takes.
        self.own_queues = "QUEUES" in params
        if not self.own_queues:
            self.queues = set()

    @property
    def supports_get_result(self) -> bool:  # type: ignore[override]
        """True where every result is kept (``RESULTS`` ``"all"``): only then can
        ``get_result`` find a task that is waiting, running or succeeded."""
        return self.results_mode() == "all"

    def results_mode(self) -> str:
        """What this backend's tasks keep: its ``OPTIONS["results"]``, else ``TASKS_Q``'s."""
        return str(self.options.get("results") or conf.get().RESULTS)

    # -- definition -----------------------------------------------------------------------
    def validate_task(self, task: DjangoTask) -> None:
        """Django's rules, our queues and options; registers the task so workers run it."""
        super().validate_task(task)
        if not self.own_queues and task.queue_name != DEFAULT_TASK_QUEUE_NAME:
            cfg = conf.get()
            if cfg.queues_explicit and task.queue_name not in cfg.QUEUES:
                raise InvalidTask(
                    f"Queue {task.queue_name!r} of task {task.module_path} is not in "
                    f"TASKS_Q['QUEUES'] ({', '.join(cfg.QUEUES)}); add it there")
        self.adapter(task)

    def adapter(self, task: DjangoTask) -> DjangoTaskAdapter:
        """Our registered task that runs ``task`` (registered now when it is new)."""
        found = registered(task)
        # One set of options per function: those of the backend it was defined with, made
        # again when that backend's OPTIONS change (settings overridden in tests).
        if found is not None and (found.django_task.backend != self.alias
                                  or found.defaults == self.defaults):
            return found
        try:
            own = clean_options({key: getattr(task, key, None) for key in OPTIONS})
            return register(task, self.defaults, own)
        except ValueError as exc:
            raise InvalidTask(f"Task {task.module_path}: {exc}") from None

    @functools.cached_property
    def defaults(self) -> dict[str, Any]:
        """Our options from this backend's ``OPTIONS``, for each of its tasks."""
        try:
            return clean_options(self.options)
        except ValueError as exc:
            raise InvalidTask(f"TASKS[{self.alias!r}]['OPTIONS']: {exc}") from None

    # -- enqueue --------------------------------------------------------------------------
    def enqueue(self, task: Task[P, R], args: Any, kwargs: Any) -> TaskResult[P, R]:
        """Send ``task`` through our client (routes, ``ENQUEUE_ON_COMMIT``); READY at once, or
        finished already in ``EAGER`` mode."""
        self.validate_task(task)
        adapter = self.adapter(task)
        args, kwargs = list(args), dict(kwargs)
        # Django's default queue name stands for no choice: routes, then DEFAULT_QUEUE, apply.
        own_queue = None if task.queue_name == DEFAULT_TASK_QUEUE_NAME else task.queue_name
        queue, _ = client.route(adapter.name, own_queue, None, None)
        run_after = task.run_after
        if run_after is not None and timezone.is_naive(run_after):  # USE_TZ = False
            run_after = timezone.make_aware(run_after)
        now = timezone.now()
        task_id = message.new_id()

        def send() -> AsyncResult:
            return adapter.apply_async(
                args=args, kwargs=kwargs, eta=run_after, queue=queue,
                priority=broker_priority(task.priority), task_id=task_id,
                headers={BACKEND_HEADER: self.alias, PRIORITY_HEADER: task.priority,
                         ENQUEUED_HEADER: now.isoformat()})

        eager = client.runs_eagerly()
        if eager:  # runs below, after task_enqueued, as in Django's ImmediateBackend
            client.encode_body(adapter.name, args, kwargs)  # bad arguments refused first
        else:
            send()
        result = self._result(task, task_id, now, args, kwargs)
        if mode_for(adapter) == "all":
            self._pending_row(adapter, result, queue)
        task_enqueued.send(type(self), task_result=result)
        if eager:
            self._eager_outcome(result, send())
        return result

    @staticmethod
    def _pending_row(adapter: DjangoTaskAdapter, result: DjangoResult, queue: str) -> None:
        # In the caller's transaction, so get_result finds it from now on; a worker that was
        # quicker has written its own row, which stays.
        from .models import TaskResult as ResultRow  # the app registry is ready by now

        ResultRow.objects.bulk_create([ResultRow(
            task_id=result.id, task_name=adapter.name, status=TaskState.PENDING,
            args=result.args, kwargs=result.kwargs, queue=queue,
            priority=broker_priority(result.task.priority),
            date_created=result.enqueued_at or timezone.now())],
            ignore_conflicts=True)

    def _result(self, task: Task[P, R], task_id: str, now: datetime, args: list[Any],
                kwargs: dict[str, Any]) -> TaskResult[P, R]:
        return TaskResult(task=task, id=task_id, status=TaskResultStatus.READY, enqueued_at=now,
                          started_at=None, finished_at=None, last_attempted_at=None, args=args,
                          kwargs=kwargs, backend=self.alias, errors=[], worker_ids=[])

    @staticmethod
    def _eager_outcome(result: DjangoResult, sent: AsyncResult) -> None:
        # Anything but a success or a failure (a Reject) did not run to its end: FAILED.
        status = STATUSES.get(sent.status, TaskResultStatus.FAILED)
        if status == TaskResultStatus.READY:
            status = TaskResultStatus.FAILED
        started = result.enqueued_at
        for name, value in (("status", status), ("started_at", started),
                            ("last_attempted_at", started), ("finished_at", timezone.now()),
                            ("worker_ids", ["eager"])):
            object.__setattr__(result, name, value)
        outcome = sent.result
        if status == TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", plain(outcome))
        elif isinstance(outcome, BaseException):
            result.errors.append(task_error(outcome, sent.traceback or ""))

    # -- results --------------------------------------------------------------------------
    def get_result(self, result_id: str) -> DjangoResult:
        """The stored result ``result_id``: ``TaskResultDoesNotExist`` when there is none,
        ``ResultNotKept`` (one of those) when this backend keeps only some results."""
        from .models import TaskResult as ResultRow

        row = ResultRow.objects.filter(task_id=result_id).first()
        if row is None:
            mode = self.results_mode()
            if mode != "all":
                kept = "only failures" if mode == "errors" else "no results"
                raise ResultNotKept(
                    f"No result {result_id!r}: TASKS[{self.alias!r}] keeps {kept} (RESULTS "
                    f"{mode!r}), so a task that is waiting, running or succeeded has none. To "
                    f"keep every result, set TASKS_Q['RESULTS'] = 'all', or 'OPTIONS': "
                    f"{{'results': 'all'}} on this backend")
            raise TaskResultDoesNotExist(result_id)
        try:
            found = registry.get(row.task_name, {BACKEND_HEADER: self.alias})
        except TaskNotRegistered as exc:
            raise TaskResultDoesNotExist(f"{result_id}: {exc}") from None
        if not isinstance(found, DjangoTaskAdapter):
            raise TaskResultDoesNotExist(
                f"{result_id} is a result of {row.task_name}, a django_tasks_q task rather than "
                f"a django.tasks one: read it with django_tasks_q.AsyncResult")
        return from_row(row, found, self.alias)

    # -- checks ---------------------------------------------------------------------------
    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        """E101 app not installed, E102 queues TASKS_Q lacks, E103/E104 bad ``OPTIONS``."""
        where = f"TASKS[{self.alias!r}]"
        found: list[checks.CheckMessage] = []
        if not apps.is_installed("django_tasks_q"):
            found.append(checks.Error(
                f"{where} uses TasksQBackend, but django_tasks_q is not in INSTALLED_APPS.",
                hint="Add 'django_tasks_q' to INSTALLED_APPS: its models keep results and "
                     "its taskworker runs the tasks.", id="django_tasks_q.E101"))
        try:
            cfg = conf.get()
        except (TypeError, ValueError):
            cfg = None  # a bad TASKS_Q is django_tasks_q.E001's to report
        if self.own_queues and cfg is not None and cfg.queues_explicit:
            missing = sorted(q for q in self.queues
                             if q != DEFAULT_TASK_QUEUE_NAME and q not in cfg.QUEUES)
            if missing:
                found.append(checks.Error(
                    f"{where}['QUEUES'] has {', '.join(map(repr, missing))}, which "
                    f"TASKS_Q['QUEUES'] does not.",
                    hint="Add them to TASKS_Q['QUEUES'] (tasks sent there would be refused), "
                         "or leave QUEUES out of TASKS to take TASKS_Q's.",
                    id="django_tasks_q.E102"))
        options = self.options if isinstance(self.options, dict) else {}
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            found.append(checks.Error(
                f"{where}['OPTIONS'] has unknown key(s) {', '.join(map(repr, unknown))}.",
                hint=f"Known keys: {', '.join(OPTIONS)}.", id="django_tasks_q.E103"))
        try:
            clean_options({k: v for k, v in options.items() if k in OPTIONS})
        except ValueError as exc:
            found.append(checks.Error(f"{where}['OPTIONS']: {exc}.",
                                      hint="See 'Using Django's tasks framework' in the docs.",
                                      id="django_tasks_q.E104"))
        return found
