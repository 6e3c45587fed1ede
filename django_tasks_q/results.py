"""API: ``AsyncResult`` and the database result store (what is kept, per ``RESULTS`` mode)."""

from __future__ import annotations

import builtins
import importlib
import time
from collections.abc import Callable, Iterator
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


def failure_of(task_id: str, state: str, stored: Any) -> BaseException:
    """What waiting for a task that ended without success raises: ``TaskRevokedError`` for a
    revoked one, else its own exception rebuilt."""
    if state == TaskState.REVOKED:
        return TaskRevokedError(f"Task {task_id} was revoked: {stored}")
    return rebuild_exception(stored)


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

    def __init__(self, id: str, task: Task[Any, Any] | None = None,  # noqa: A002
                 kept: bool = False) -> None:
        self.id = id
        self.task = task
        #: The result before it in a chain (a chord's body: its header's ``GroupResult``).
        self.parent: AsyncResult | GroupResult | None = None
        self._kept = kept  # stored for a workflow, whatever its task keeps
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
        if self.task is None or self._kept:
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
            raise failure_of(self.id, row.status, row.result)
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


class GroupResult:
    """A handle on a group's results (``group(...).apply_async()``), in the group's order."""

    def __init__(self, id: str, results: list[AsyncResult]) -> None:  # noqa: A002
        self.id = id
        self.results = results
        self.parent: AsyncResult | GroupResult | None = None

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __iter__(self) -> Iterator[AsyncResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    @classmethod
    def restore(cls, group_id: str) -> GroupResult:
        """The handle of a group sent earlier, from its stored row; ``LookupError`` if none."""
        from .models import TaskGroup

        ids = TaskGroup.objects.filter(group_id=group_id).values_list("task_ids", flat=True)
        found = ids.first()
        if found is None:
            raise LookupError(f"No group {group_id!r} is stored (never sent, or pruned after "
                              f"RESULT_EXPIRES)")
        return cls(group_id, [AsyncResult(task_id, kept=True) for task_id in found])

    def _outcomes(self) -> list[tuple[str, Any]]:
        """Each member's (state, stored result), with one query for all of them (two when a
        chord's body took members' results that are no longer stored one by one)."""
        from .models import TaskGroup

        stored = {r.id: (r.status, r.result) for r in self.results if isinstance(r, EagerResult)}
        waiting = [r.id for r in self.results if r.id not in stored]
        if waiting:
            stored.update((task_id, (state, value)) for task_id, state, value in
                          TaskResult.objects.filter(task_id__in=waiting)
                          .values_list("task_id", "status", "result"))
        if len(stored) < len(self.results):
            given = TaskGroup.objects.filter(group_id=self.id).values_list("results", flat=True)
            values = given.first()
            if values is not None:
                for result, value in zip(self.results, values, strict=False):
                    stored.setdefault(result.id, (TaskState.SUCCESS, value))
        return [stored.get(r.id, (TaskState.PENDING, None)) for r in self.results]

    def ready(self) -> bool:
        """True once every member has finished."""
        return all(state in READY_STATES for state, _ in self._outcomes())

    def successful(self) -> bool:
        """True once every member has succeeded."""
        return all(state == TaskState.SUCCESS for state, _ in self._outcomes())

    def failed(self) -> bool:
        """True when a member failed."""
        return any(state == TaskState.FAILURE for state, _ in self._outcomes())

    def completed_count(self) -> int:
        """How many members have succeeded."""
        return sum(state == TaskState.SUCCESS for state, _ in self._outcomes())

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.05) -> list[Any]:
        """Wait for every member; their results in order (a failure re-raised when
        ``propagate``, else the exception in its place)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = interval
        while True:
            outcomes = self._outcomes()
            if all(state in READY_STATES for state, _ in outcomes):
                break
            if deadline is not None and time.monotonic() >= deadline:
                done = sum(state in READY_STATES for state, _ in outcomes)
                raise TimeoutError(f"Group {self.id}: {done} of {len(outcomes)} tasks "
                                   f"finished within {timeout}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        values = []
        for result, (state, value) in zip(self.results, outcomes, strict=True):
            if isinstance(result, EagerResult):
                values.append(result.get(propagate=propagate))
            elif state == TaskState.SUCCESS:
                values.append(value)
            elif propagate:
                raise failure_of(result.id, state, value)
            else:
                values.append(failure_of(result.id, state, value))
        return values

    join = get

    def forget(self) -> None:
        """Delete the members' stored outcomes and the group's row."""
        from .models import TaskGroup

        TaskResult.objects.filter(task_id__in=[r.id for r in self.results]).delete()
        TaskGroup.objects.filter(group_id=self.id).delete()

    def revoke(self, terminate: bool = False) -> None:
        """Revoke every member that has not finished."""
        for result in self.results:
            result.revoke(terminate=terminate)


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
            from .models import TaskGroup

            # Groups and chords go with their members (a chord's row holds its results).
            TaskGroup.objects.filter(date_created__lt=cutoff).delete()
            return total
        total += deleted
        if progress is not None:
            progress(total)
