"""Execution: one run of one task message (gates, run, retry decision, stored outcome)."""

from __future__ import annotations

import logging
import traceback as tb_module
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from . import registry, results, signals
from .exceptions import Reject, Retry, TaskNotRegistered
from .models import TaskState
from .task import Request, _current

if TYPE_CHECKING:
    from .message import TaskMessage
    from .task import Task

logger = logging.getLogger("django_tasks_q.execute")

REJECT = "REJECT"  # drop the message without storing anything
REQUEUE = "REQUEUE"  # give the message back to the broker


@dataclass
class Outcome:
    """What became of one run; small and plain so it crosses a pipe from a pool child."""

    status: str
    retry_eta: str | None = None  # ISO time the retry is due, for RETRY
    runtime: float = 0.0
    error: str = ""  # "Type: message" for logs
    # Only filled for inline (eager) runs, never sent between processes:
    value: Any = None
    exc: BaseException | None = None
    traceback: str | None = None


def _fail(msg: TaskMessage, task: Task[Any, Any] | None, exc: BaseException, tb: str,
          hostname: str, started: datetime | None) -> Outcome:
    if results.mode_for(task) != "none":
        results.store(msg, TaskState.FAILURE, result=results.exception_info(exc), traceback=tb,
                      worker=hostname, date_started=started)
    return Outcome(TaskState.FAILURE, error=f"{type(exc).__name__}: {exc}", exc=exc,
                   traceback=tb)


def run(msg: TaskMessage, hostname: str = "", eager: bool = False) -> Outcome:
    """Run ``msg`` through the gates and the task; store what the result mode asks for."""
    try:
        task = registry.get(msg.name)
    except TaskNotRegistered as exc:
        logger.error("Task %s[%s] refused: %s", msg.name, msg.id, exc)
        return _fail(msg, None, exc, "", hostname, None)

    now = datetime.now(UTC)
    if msg.expires is not None and msg.expires <= now:
        logger.info("Task %s[%s] expired at %s; not run", msg.name, msg.id, msg.expires)
        if results.mode_for(task) != "none":
            results.store(msg, TaskState.REVOKED, worker=hostname,
                          result={"reason": "expired", "expires": msg.expires.isoformat()})
        signals.task_revoked.send(sender=task, request=msg, expired=True, terminated=False)
        return Outcome(TaskState.REVOKED, error="expired")

    request = Request(id=msg.id, task=msg.name, args=msg.args, kwargs=msg.kwargs,
                      retries=msg.retries, eta=msg.eta, expires=msg.expires, queue=msg.queue,
                      hostname=hostname, root_id=msg.root_id, parent_id=msg.parent_id,
                      headers=msg.headers, is_eager=eager, called_directly=False)
    token = _current.set(request)
    started = timezone.now()
    signals.task_prerun.send(sender=task, task_id=msg.id, task=task, args=msg.args,
                             kwargs=msg.kwargs)
    try:
        return _invoke(task, msg, hostname, started)
    finally:
        signals.task_postrun.send(sender=task, task_id=msg.id, task=task, args=msg.args,
                                  kwargs=msg.kwargs)
        _current.reset(token)


def _invoke(task: Task[Any, Any], msg: TaskMessage, hostname: str,
            started: datetime) -> Outcome:
    clock = datetime.now()
    try:
        try:
            value = task(*msg.args, **msg.kwargs)
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
        signals.task_retry.send(sender=task, request=msg, reason=cause, einfo=einfo)
        eta = datetime.now(UTC) + timedelta(seconds=retry.when or 0)
        logger.info("Task %s[%s] retry %d in %.1fs: %s", msg.name, msg.id, msg.retries + 1,
                    retry.when or 0, cause)
        return Outcome(TaskState.RETRY, retry_eta=eta.isoformat(), error=repr(cause),
                       exc=retry.exc)
    except Reject as rej:
        logger.warning("Task %s[%s] rejected (requeue=%s): %s", msg.name, msg.id, rej.requeue,
                       rej.reason)
        return Outcome(REQUEUE if rej.requeue else REJECT, error=str(rej.reason or ""))
    except Exception as exc:
        einfo = tb_module.format_exc()
        outcome = _fail(msg, task, exc, einfo, hostname, started)
        task.on_failure(exc, msg.id, msg.args, msg.kwargs, einfo)
        signals.task_failure.send(sender=task, task_id=msg.id, exception=exc, args=msg.args,
                                  kwargs=msg.kwargs, traceback=einfo)
        logger.error("Task %s[%s] failed: %s", msg.name, msg.id, outcome.error)
        outcome.runtime = (datetime.now() - clock).total_seconds()
        return outcome
    if results.mode_for(task) == "all":
        results.store(msg, TaskState.SUCCESS, result=value, worker=hostname,
                      date_started=started)
    task.on_success(value, msg.id, msg.args, msg.kwargs)
    signals.task_success.send(sender=task, result=value)
    return Outcome(TaskState.SUCCESS, value=value,
                   runtime=(datetime.now() - clock).total_seconds())


def run_eager(task: Task[Any, Any], msg: TaskMessage) -> results.EagerResult:
    """Run ``msg`` inline, retries included (without waiting), for ``EAGER`` mode."""
    while True:
        outcome = run(msg, hostname="eager", eager=True)
        if outcome.status != TaskState.RETRY:
            break
        msg.retries += 1
    return results.EagerResult(msg.id, task, outcome.status, value=outcome.value,
                               exc=outcome.exc, traceback=outcome.traceback)
