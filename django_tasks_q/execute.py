"""Execution: one run of one task message (gates, run, retry decision, stored outcome)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import reprlib
import signal
import threading
import traceback as tb_module
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from . import conf, registry, signals
from .exceptions import Reject, Retry, SoftTimeLimitExceeded, TaskNotRegistered
from .message import ByPosition
from .states import READY_STATES, TaskState

if TYPE_CHECKING:
    from .message import TaskMessage
    from .models import TaskResult
    from .task import Task

logger = logging.getLogger("django_tasks_q.execute")


@dataclass
class Request:
    """What a running task knows about its own invocation (``self.request``)."""

    id: str | None = None
    task: str = ""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    queue: str = ""
    priority: int | None = None
    hostname: str = ""
    root_id: str | None = None
    parent_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    is_eager: bool = False
    called_directly: bool = True


_current: ContextVar[Request | None] = ContextVar("django_tasks_q_request", default=None)


def current_request() -> Request | None:
    """The request of the task running in this context, if any."""
    return _current.get()


def mode_for(task: Task[Any, Any] | None) -> str:
    """What is kept for ``task``: its own ``results=`` option, else ``TASKS_Q["RESULTS"]``."""
    if task is not None and task.results:
        return task.results
    return conf.get().RESULTS


def kept(task: Task[Any, Any] | None, msg: TaskMessage) -> str:
    """What is kept of this run of ``msg``: everything for a member of a group or chord (the
    workflow reads it), else what the task keeps (``mode_for``)."""
    if msg.group or msg.embed.get("chord"):
        return "all"
    return mode_for(task)


def exception_info(exc: BaseException) -> dict[str, str]:
    """The JSON form of an exception, as Celery stores it."""
    cls = type(exc)
    return {"exc_type": cls.__name__, "exc_qualname": cls.__qualname__,
            "exc_module": cls.__module__, "exc_message": str(exc)}


def result_row(msg: TaskMessage, status: str, *, result: Any = None, traceback: str = "",
               worker: str = "", date_started: datetime | None = None,
               now: datetime | None = None) -> TaskResult:
    """The ``TaskResult`` row (unsaved) that records ``status`` for ``msg``, written ``now``
    (the time of its batch)."""
    from .models import TaskResult  # models load once the app registry is ready

    now = now or timezone.now()
    return TaskResult(
        task_id=msg.id, task_name=msg.name, status=status, args=msg.args, kwargs=msg.kwargs,
        result=result, traceback=traceback, worker=worker, queue=msg.queue,
        root_id=msg.root_id or msg.id, parent_id=msg.parent_id or "", group_id=msg.group or "",
        retries=msg.retries, priority=msg.priority, date_created=now, date_started=date_started,
        date_done=now if status in READY_STATES else None,
    )


#: What a new outcome replaces in the row a task has already (a retry's, or its start's).
UPDATED_ON_CONFLICT = ("status", "result", "traceback", "worker", "queue", "retries", "priority",
                       "date_started", "date_done")


def store_rows(rows: list[TaskResult]) -> None:
    """Write ``rows`` in one statement (insert, or update the existing row of a task)."""
    from .models import TaskResult

    TaskResult.objects.bulk_create(rows, update_conflicts=True, unique_fields=["task_id"],
                                   update_fields=UPDATED_ON_CONFLICT)


def store(msg: TaskMessage, status: str, *, result: Any = None, traceback: str = "",
          worker: str = "", date_started: datetime | None = None) -> None:
    """Write the outcome of ``msg`` in one statement (insert, or update the existing row)."""
    store_rows([result_row(msg, status, result=result, traceback=traceback, worker=worker,
                           date_started=date_started)])


#: The longest repr of a return value or exception an outcome carries (Celery's default).
REPR_MAX = 1024
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = REPR_MAX
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 100
_repr.maxdict = 50


def short_repr(value: Any) -> str:
    """``repr(value)`` within ``REPR_MAX`` characters, in time bounded by its size limits."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not turn a success into an error
        return f"<{type(value).__name__} object (repr failed)>"
    return text if len(text) <= REPR_MAX else text[:REPR_MAX - 3] + "..."


REJECT = "REJECT"  # drop the message without storing anything
REQUEUE = "REQUEUE"  # give the message back to the broker


@dataclass
class Outcome(ByPosition):
    """What became of one run; small and plain so it crosses a pipe from a pool child."""

    status: str
    retry_eta: str | None = None  # ISO time the retry is due, for RETRY
    runtime: float = 0.0
    error: str = ""  # "Type: message" for logs
    retire: bool = False  # the pool child that ran it exits now (its memory limit was passed)
    result_repr: str | None = None  # short repr of the return value, for SUCCESS (events)
    exc_repr: str = ""  # short repr of the exception, for FAILURE and RETRY (events)
    traceback: str | None = None  # for FAILURE and RETRY
    #: Messages to publish before this one is acknowledged: the next step of its chain, its
    #: links, a chord's body (see ``workflow.follow_ups``).
    follow: list[tuple[TaskMessage, str]] = field(default_factory=list)
    #: A success to be stored (``results="all"``) by the worker, together with others, before
    #: its message is acknowledged: the return value as JSON text, and when the run started.
    unstored: tuple[str, datetime] | None = None
    # Only kept in the process that ran the task, never sent between processes:
    value: Any = None
    exc: BaseException | None = None


def _fail(msg: TaskMessage, task: Task[Any, Any] | None, exc: BaseException, tb: str,
          hostname: str, started: datetime | None) -> Outcome:
    if kept(task, msg) != "none":
        store(msg, TaskState.FAILURE, result=exception_info(exc), traceback=tb,
                      worker=hostname, date_started=started)
    return Outcome(TaskState.FAILURE, error=f"{type(exc).__name__}: {exc}", exc=exc,
                   exc_repr=short_repr(exc), traceback=tb)


def run(msg: TaskMessage, hostname: str = "", eager: bool = False,
        store_later: bool = False) -> Outcome:
    """Run ``msg`` through the gates and the task; store what the result mode asks for (a
    success's row is left to the caller with ``store_later``: see ``Outcome.unstored``)."""
    try:
        task = registry.get(msg.name, msg.headers)
    except TaskNotRegistered as exc:
        logger.error("Task %s[%s] refused: %s", msg.name, msg.id, exc)
        return _fail(msg, None, exc, "", hostname, None)

    now = datetime.now(UTC)
    if msg.expires is not None and msg.expires <= now:
        logger.info("Task %s[%s] expired at %s; not run", msg.name, msg.id, msg.expires)
        if kept(task, msg) != "none":
            store(msg, TaskState.REVOKED, worker=hostname,
                          result={"reason": "expired", "expires": msg.expires.isoformat()})
        signals.task_revoked.send(sender=task, request=request_for(msg, hostname, eager),
                                  terminated=False, signum=None, expired=True)
        return Outcome(TaskState.REVOKED, error="expired")

    token = _current.set(request_for(msg, hostname, eager))
    started = timezone.now()
    signals.task_prerun.send(sender=task, task_id=msg.id, task=task, args=msg.args,
                             kwargs=msg.kwargs)
    outcome: Outcome | None = None
    try:
        outcome = _invoke(task, msg, hostname, started, eager, store_later)
        return outcome
    finally:
        _postrun(task, msg, outcome)
        _current.reset(token)


#: ``task_postrun``'s ``state`` for outcomes that are not task states (Celery's name).
POSTRUN_STATES = {REJECT: "REJECTED", REQUEUE: "REJECTED"}


def _postrun(task: Task[Any, Any], msg: TaskMessage, outcome: Outcome | None) -> None:
    """Send ``task_postrun``; no ``outcome``: it could not be stored (the message goes back)."""
    retval: Any = None
    state: str | None = None
    if outcome is not None:
        retval = outcome.value if outcome.status == TaskState.SUCCESS else outcome.exc
        state = POSTRUN_STATES.get(outcome.status, outcome.status)
    signals.task_postrun.send(sender=task, task_id=msg.id, task=task, args=msg.args,
                              kwargs=msg.kwargs, retval=retval, state=state)


def request_for(msg: TaskMessage, hostname: str = "", eager: bool = False) -> Request:
    """The ``Request`` a run of ``msg`` sees as ``self.request`` (and signals carry)."""
    return Request(id=msg.id, task=msg.name, args=msg.args, kwargs=msg.kwargs,
                   retries=msg.retries, eta=msg.eta, expires=msg.expires, queue=msg.queue,
                   priority=msg.priority, hostname=hostname, root_id=msg.root_id,
                   parent_id=msg.parent_id, headers=msg.headers, is_eager=eager,
                   called_directly=False)


@contextlib.contextmanager
def soft_time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``SoftTimeLimitExceeded`` inside the block once ``seconds`` have passed.

    Only where signals can be delivered to the running code: the main thread of a process.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: FrameType | None) -> None:
        raise SoftTimeLimitExceeded(f"soft time limit ({seconds:g}s) exceeded")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_coroutine(coro: Coroutine[Any, Any, Any], soft_limit: float | None = None) -> Any:
    """Run ``coro`` to its end as Django's ``Task.call`` does (asgiref's ``async_to_sync``, so
    ``sync_to_async`` code uses this thread's database connections); ``SoftTimeLimitExceeded``
    once ``soft_limit`` seconds have passed."""
    async def bounded() -> Any:
        if not soft_limit:
            return await coro
        # SIGALRM would land in this thread, not in the loop running the coroutine: the loop
        # cancels it instead, at its next await.
        timer = asyncio.timeout(soft_limit)
        try:
            async with timer:
                return await coro
        except TimeoutError as exc:
            if not timer.expired():
                raise
            raise SoftTimeLimitExceeded(f"soft time limit ({soft_limit:g}s) exceeded") from exc

    return async_to_sync(bounded)()


#: Whether each task function is a coroutine function: inspect's answer, asked once.
_coroutine_functions: dict[Callable[..., Any], bool] = {}


def _is_coroutine_function(run: Callable[..., Any]) -> bool:
    known = _coroutine_functions.get(run)
    if known is None:
        known = _coroutine_functions[run] = inspect.iscoroutinefunction(run)
    return known


def _call(task: Task[Any, Any], msg: TaskMessage, soft_limit: float | None) -> Any:
    if _is_coroutine_function(task.run):
        return run_coroutine(task(*msg.args, **msg.kwargs), soft_limit)
    with soft_time_limit(soft_limit):
        value = task(*msg.args, **msg.kwargs)
    if inspect.iscoroutine(value):  # a sync wrapper around an async function
        return run_coroutine(value, soft_limit)
    return value


def _invoke(task: Task[Any, Any], msg: TaskMessage, hostname: str, started: datetime,
            eager: bool, store_later: bool = False) -> Outcome:
    clock = datetime.now()
    try:
        try:
            value = _call(task, msg, None if eager else msg.soft_time_limit)
        except Retry:
            raise
        except Reject:
            raise
        except task.autoretry_for as exc:
            if task.max_retries is not None and msg.retries >= task.max_retries:
                raise
            raise Retry(exc=exc, when=task.retry_countdown(msg.retries)) from exc
    except Retry as retry:
        cause = retry.exc or retry
        einfo = tb_module.format_exc()
        task.on_retry(cause, msg.id, msg.args, msg.kwargs, einfo)
        signals.task_retry.send(sender=task, request=current_request(), reason=cause,
                                einfo=einfo)
        eta = datetime.now(UTC) + timedelta(seconds=retry.when or 0)
        logger.info("Task %s[%s] retry %d in %.1fs: %s", msg.name, msg.id, msg.retries + 1,
                    retry.when or 0, cause)
        return Outcome(TaskState.RETRY, retry_eta=eta.isoformat(), error=repr(cause),
                       exc=retry.exc, exc_repr=short_repr(cause), traceback=einfo)
    except Reject as rej:
        logger.warning("Task %s[%s] rejected (requeue=%s): %s", msg.name, msg.id, rej.requeue,
                       rej.reason)
        return Outcome(REQUEUE if rej.requeue else REJECT, error=str(rej.reason or ""))
    except Exception as exc:
        einfo = tb_module.format_exc()
        outcome = _fail(msg, task, exc, einfo, hostname, started)
        _failed(task, msg, exc, einfo)
        logger.error("Task %s[%s] failed: %s", msg.name, msg.id, outcome.error)
        outcome.runtime = (datetime.now() - clock).total_seconds()
        return outcome
    unstored = None
    if kept(task, msg) == "all":
        try:
            # Checked before the write: a failed write would spoil the caller's transaction.
            encoded = json.dumps(value, cls=DjangoJSONEncoder)
        except (TypeError, ValueError) as exc:
            bad = TypeError(f"the return value ({type(value).__name__}) cannot be stored as "
                            f"JSON: {exc}; return plain data, or use results='errors'")
            logger.error("Task %s[%s] failed: %s", msg.name, msg.id, bad)
            outcome = _fail(msg, task, bad, "", hostname, started)
            _failed(task, msg, bad, "")
            return outcome
        if store_later:
            unstored = (encoded, started)
        else:
            store(msg, TaskState.SUCCESS, result=value, worker=hostname, date_started=started)
    task.on_success(value, msg.id, msg.args, msg.kwargs)
    signals.task_success.send(sender=task, result=value)
    return Outcome(TaskState.SUCCESS, value=value, result_repr=short_repr(value),
                   runtime=(datetime.now() - clock).total_seconds(), unstored=unstored)


def _failed(task: Task[Any, Any], msg: TaskMessage, exc: BaseException, einfo: str) -> None:
    """Tell the task's ``on_failure`` and the ``task_failure`` receivers."""
    task.on_failure(exc, msg.id, msg.args, msg.kwargs, einfo)
    signals.task_failure.send(sender=task, task_id=msg.id, exception=exc, args=msg.args,
                              kwargs=msg.kwargs, traceback=einfo, einfo=einfo)
