"""API: ``AsyncResult`` and the database result store (what is kept, per ``RESULTS`` mode)."""

from __future__ import annotations

import builtins
import importlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from . import conf
from .exceptions import ResultsNotKept, TaskFailed, TaskRevokedError, TimeoutError
from .execute import mode_for, store
from .models import READY_STATES, TaskResult, TaskState

if TYPE_CHECKING:
    from .task import Task


def rebuild_exception(info: Any) -> BaseException:
    """An exception instance from its stored form (a stand-in class when it cannot be imported)."""
    if not isinstance(info, dict):
        return TaskFailed(str(info))
    name, module = str(info.get("exc_type", "Exception")), info.get("exc_module") or "builtins"
    text = str(info.get("exc_message", ""))
    try:
        found: Any = builtins if module == "builtins" else importlib.import_module(module)
        for part in str(info.get("exc_qualname") or name).split("."):
            found = getattr(found, part)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found(text)
    except Exception:  # noqa: BLE001 - fall back to a stand-in below
        pass
    stand_in: TaskFailed = type(name, (TaskFailed,), {"__module__": module})(text)
    return stand_in


def store_state(task_id: str | None, task: Task[Any, Any], state: str, meta: Any) -> None:
    """Record a custom state with ``meta`` (progress) for a running task."""
    if not task_id:
        return
    req = task.request
    from .message import TaskMessage

    msg = TaskMessage(id=task_id, name=task.name, args=req.args, kwargs=req.kwargs,
                      retries=req.retries, queue=req.queue)
    store(msg, state, result=meta, worker=req.hostname)


class AsyncResult:
    """A handle on one task's outcome, read from the database result store."""

    def __init__(self, id: str, task: Task[Any, Any] | None = None) -> None:  # noqa: A002
        self.id = id
        self.task = task
        self._row: TaskResult | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _fetch(self) -> TaskResult | None:
        if self._row is None or self._row.status not in READY_STATES:
            self._row = TaskResult.objects.filter(task_id=self.id).first()
        return self._row

    @property
    def status(self) -> str:
        """The task's state; ``PENDING`` when nothing is stored (yet)."""
        row = self._fetch()
        return row.status if row else TaskState.PENDING

    state = status

    def ready(self) -> bool:
        """True once the task has finished (success, failure or revoked)."""
        return self.status in READY_STATES

    def successful(self) -> bool:
        """True when the task finished and returned."""
        return self.status == TaskState.SUCCESS

    def failed(self) -> bool:
        """True when the task finished by raising."""
        return self.status == TaskState.FAILURE

    @property
    def result(self) -> Any:
        """The return value, the exception for a failure, or None while not ready."""
        row = self._fetch()
        if row is None:
            return None
        if row.status == TaskState.FAILURE:
            return rebuild_exception(row.result)
        return row.result

    info = result

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failure."""
        row = self._fetch()
        return row.traceback if row and row.traceback else None

    def _check_kept(self) -> None:
        if self.task is None:
            return  # a bare id: its task may keep results even where the default does not
        mode = mode_for(self.task)
        if mode == "all":
            return
        name = self.task.name
        if mode == "none":
            raise ResultsNotKept(
                f"{name} keeps no results (results='none'), so .get() would wait forever; "
                f"set results='all' on the task (or TASKS_Q['RESULTS'] = 'all') to wait for it")
        raise ResultsNotKept(
            f"{name} keeps only failures (results='errors', the default), so .get() cannot "
            f"wait for its return value; set results='all' on the task (or "
            f"TASKS_Q['RESULTS'] = 'all') to keep and wait for it")

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.05) -> Any:
        """Wait for the outcome and return it (re-raising a failure when ``propagate``)."""
        row = self._fetch()
        if row is None or row.status not in READY_STATES:
            self._check_kept()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = interval
        while row is None or row.status not in READY_STATES:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Task {self.id} did not finish within {timeout}s "
                                   f"(status {row.status if row else 'PENDING'})")
            time.sleep(delay if deadline is None else min(delay, max(0.0,
                                                                     deadline - time.monotonic())))
            delay = min(delay * 1.5, 1.0)
            row = self._fetch()
        if row.status == TaskState.SUCCESS:
            return row.result
        if propagate:
            if row.status == TaskState.REVOKED:
                raise TaskRevokedError(f"Task {self.id} was revoked: {row.result}")
            raise rebuild_exception(row.result)
        return self.result

    def forget(self) -> None:
        """Delete the stored outcome."""
        TaskResult.objects.filter(task_id=self.id).delete()
        self._row = None

    def revoke(self, terminate: bool = False) -> None:
        """Mark the task revoked: a worker that receives it later does not run it."""
        from .message import TaskMessage

        if TaskResult.objects.filter(task_id=self.id, status__in=READY_STATES).exists():
            return  # finished already: its outcome stays as it is
        name = self.task.name if self.task else ""
        store(TaskMessage(id=self.id, name=name, args=[], kwargs={}), TaskState.REVOKED,
              result={"reason": "revoked", "terminate": terminate})


class EagerResult(AsyncResult):
    """The outcome of a task run inline (``EAGER``): known at once, nothing to wait for."""

    def __init__(self, id: str, task: Task[Any, Any] | None, status: str, value: Any = None,  # noqa: A002
                 exc: BaseException | None = None, traceback: str | None = None) -> None:
        super().__init__(id, task)
        self._status, self._value, self._exc, self._tb = status, value, exc, traceback

    @property
    def status(self) -> str:
        return self._status

    state = status

    @property
    def result(self) -> Any:
        return self._exc if self._exc is not None else self._value

    info = result

    @property
    def traceback(self) -> str | None:
        return self._tb

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.05) -> Any:
        if self._exc is not None and propagate:
            raise self._exc
        return self.result


#: Rows one statement of ``prune`` deletes: each is short, however many rows have expired.
PRUNE_BATCH = 5000


def prune(older_than: datetime | None = None,
          progress: Callable[[int], None] | None = None) -> int:
    """Delete finished rows older than ``RESULT_EXPIRES`` (or ``older_than``), PRUNE_BATCH at a
    time, each batch a statement of its own; returns how many went. ``progress`` hears the
    running total after each batch."""
    cutoff = older_than or timezone.now() - conf.get().RESULT_EXPIRES
    batch = TaskResult.objects.filter(date_done__lt=cutoff).order_by().values("pk")
    total = 0
    while True:
        # One statement per batch (no cascades or signals to collect): the rows never leave
        # the database.
        deleted, _ = TaskResult.objects.filter(pk__in=batch[:PRUNE_BATCH]).delete()
        if not deleted:
            return total
        total += deleted
        if progress is not None:
            progress(total)
