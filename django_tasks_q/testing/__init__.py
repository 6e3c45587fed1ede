"""Surface: helpers for users' tests: capture the tasks code sends, and run them on demand."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .. import client, message, registry
from ..exceptions import TaskNotRegistered, TasksQError
from ..task import Task

if TYPE_CHECKING:
    from ..results import EagerResult

__all__ = ["Captured", "CapturedTasks", "TasksDidNotSettle", "capture_tasks"]

logger = logging.getLogger("django_tasks_q.testing")

#: How many tasks one ``CapturedTasks.run()`` runs at most before it gives up.
RUN_LIMIT = 100


class TasksDidNotSettle(TasksQError, RuntimeError):
    """``CapturedTasks.run()`` ran its limit of tasks and they were still sending more."""


@dataclass(frozen=True)
class Captured:
    """One task message sent while capturing, as a worker would have received it."""

    #: The task, or None when this process does not know the name (``send_task``).
    task: Task[Any, Any] | None
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    priority: int | None
    #: Seconds from sending to ``eta`` (to the millisecond), or None when it may run at once.
    countdown: float | None
    eta: datetime | None
    expires: datetime | None
    task_id: str
    #: Headers beyond the protocol's own: ``apply_async(headers=...)``, and what
    #: ``before_task_publish`` receivers added.
    headers: dict[str, Any]
    #: The id of the task that sent this one, when a task sent it.
    parent_id: str | None
    message: message.TaskMessage = field(repr=False, compare=False)

    @classmethod
    def from_wire(cls, body: str, headers: dict[str, Any], queue: str, priority: int | None,
                  sent_at: datetime) -> Captured:
        """The record of a message as it would have been published."""
        msg = message.decode(dict(headers), json.loads(body), queue=queue, priority=priority)
        try:
            known: Task[Any, Any] | None = registry.get(msg.name, msg.headers)
        except TaskNotRegistered:
            known = None
        countdown = None if msg.eta is None else round((msg.eta - sent_at).total_seconds(), 3)
        return cls(task=known, name=msg.name, args=msg.args, kwargs=msg.kwargs, queue=msg.queue,
                   priority=msg.priority, countdown=countdown, eta=msg.eta, expires=msg.expires,
                   task_id=msg.id, headers=msg.headers, parent_id=msg.parent_id, message=msg)


def _name(which: Task[Any, Any] | str) -> str:
    return which if isinstance(which, str) else which.name


class CapturedTasks(list[Captured]):
    """The tasks sent while capturing, in the order they were sent; none runs until asked."""

    def __init__(self) -> None:
        super().__init__()
        # Keyed by id() and holding the record, so that an id is never reused while it counts.
        self._ran: dict[int, Captured] = {}

    def __repr__(self) -> str:
        shown = ", ".join(f"{r.name}(args={r.args!r}, kwargs={r.kwargs!r})" for r in self)
        return f"<CapturedTasks [{shown}]>"

    def _take(self, body: str, headers: dict[str, Any], queue: str, priority: int | None,
              sent_at: datetime) -> None:
        self.append(Captured.from_wire(body, headers, queue, priority, sent_at))

    def filter(self, task: Task[Any, Any] | str | None = None, *,
               queue: str | None = None) -> list[Captured]:
        """The captured messages of ``task`` (the task or its name) and/or sent to ``queue``."""
        return [r for r in self if (task is None or r.name == _name(task))
                and (queue is None or r.queue == queue)]

    @property
    def pending(self) -> list[Captured]:
        """The captured messages that have not been run yet."""
        return [r for r in self if id(r) not in self._ran]

    def clear(self) -> None:
        """Forget everything captured so far (capturing goes on)."""
        super().clear()
        self._ran.clear()

    def run(self, task: Task[Any, Any] | str | None = None, *, limit: int = RUN_LIMIT,
            propagate: bool = False) -> list[EagerResult]:
        """Run the pending tasks (only ``task``'s, if given) in the order they were sent, then
        those they send while running, as a worker of this process would; their results.

        Messages for tasks this process does not know stay pending. A failure is stored and
        returned as a result; ``propagate=True`` raises the first one once all have run.
        """
        def runnable(record: Captured) -> bool:
            return (id(record) not in self._ran and record.task is not None
                    and (task is None or record.name == _name(task)))

        results: list[EagerResult] = []
        with _activate(self):
            index = 0
            while index < len(self):  # grows while tasks send more
                record = self[index]
                index += 1
                if not runnable(record):
                    continue
                if len(results) >= limit:
                    waiting = sum(1 for r in self[index - 1:] if runnable(r))
                    raise TasksDidNotSettle(
                        f"Captured tasks did not settle: {limit} ran and {waiting} more are "
                        f"waiting (next: {record.name}). A task that sends itself again never "
                        f"settles; pass run(limit=...) if the chain is just long.")
                results.append(self._execute(record))
        if propagate:
            for result in results:
                result.get(propagate=True)
        return results

    def run_one(self, which: Captured | Task[Any, Any] | str | None = None) -> EagerResult:
        """Run one captured message: ``which`` itself (even if it ran before, even if its task
        is unknown here), or the first pending one (of task ``which``) that ``run()`` would
        run; what it sends while running is captured, not run."""
        if isinstance(which, Captured):
            if not any(r is which for r in self):
                raise ValueError(f"{which!r} was not captured here")
            record = which
        else:
            found = [r for r in self.pending if r.task is not None
                     and (which is None or r.name == _name(which))]
            if not found:
                of = f" of {_name(which)}" if which is not None else ""
                raise LookupError(f"No pending captured task{of}; captured: {self!r}")
            record = found[0]
        with _activate(self):
            return self._execute(record)

    def _execute(self, record: Captured) -> EagerResult:
        self._ran[id(record)] = record
        msg = copy.deepcopy(record.message)  # the task may change its arguments; keep ours
        with _commit_like_a_worker():
            return client.run_eager(record.task, msg)  # retries at once, as EAGER runs them


_active: list[CapturedTasks] = []
_active_lock = threading.Lock()


@contextlib.contextmanager
def _activate(captured: CapturedTasks) -> Iterator[CapturedTasks]:
    with _active_lock:
        _active.append(captured)
        client.capture = captured._take
    try:
        yield captured
    finally:
        with _active_lock:
            # By identity: two CapturedTasks with the same contents compare equal.
            last = max(i for i, c in enumerate(_active) if c is captured)
            del _active[last]
            client.capture = _active[-1]._take if _active else None


@contextlib.contextmanager
def capture_tasks() -> Iterator[CapturedTasks]:
    """Capture every task sent in the block, instead of publishing it: nothing reaches the
    broker. Inside the code's own ``transaction.atomic()``, a task is captured on commit."""
    with _activate(CapturedTasks()) as captured:
        yield captured


@contextlib.contextmanager
def _commit_like_a_worker() -> Iterator[None]:
    """Run the on-commit callbacks a task registered once it has finished, when it runs
    inside a Django ``TestCase``, whose transaction never commits."""
    from django.db import transaction

    conn = transaction.get_connection()
    if not conn.in_atomic_block or client._in_transaction():
        # Outside any transaction the task's own atomic() blocks commit for real; inside the
        # test's own atomic(), its callbacks wait for that commit, as everything else does.
        yield
        return
    start = len(conn.run_on_commit)
    yield
    while len(conn.run_on_commit) > start:
        # Taken off the list, as a commit does, so that captureOnCommitCallbacks() around the
        # test does not run them a second time.
        callbacks = conn.run_on_commit[start:]
        del conn.run_on_commit[start:]
        for _savepoints, callback, robust in callbacks:
            if not robust:
                callback()
                continue
            try:
                callback()
            except Exception:
                logger.exception("Error calling %s in on_commit()", callback)
