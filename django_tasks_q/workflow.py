"""API: what follows a finished task in its workflow (next chain step, links, errbacks, a chord's
body), worked out where the task ran and published by the worker before it acknowledges."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from . import execute, registry
from .exceptions import ChordError, TaskRevokedError
from .message import TaskMessage
from .states import TaskState

if TYPE_CHECKING:
    from .client import Outgoing
    from .models import TaskGroup
    from .task import Task

logger = logging.getLogger("django_tasks_q.workflow")

#: Outcomes after which a task does not run again: what follows it is decided.
_ENDED = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED, execute.REJECT})


def in_workflow(msg: TaskMessage) -> bool:
    """True when something follows ``msg`` (or waits for it): one look at its embed."""
    embed = msg.embed
    return bool(embed.get("chain") or embed.get("callbacks") or embed.get("errbacks")
                or embed.get("chord"))


def follow_ups(msg: TaskMessage, outcome: execute.Outcome) -> list[Outgoing]:
    """The messages that follow ``msg``'s ``outcome``. Errbacks that take ``(request, exc,
    traceback)`` are called here, in the process that records the failure (as Celery does)."""
    if outcome.status not in _ENDED or not in_workflow(msg):
        return []
    embed = msg.embed
    lineage = {"parent_id": msg.id, "root_id": msg.root_id or msg.id}
    out: list[Outgoing] = []
    if outcome.status == TaskState.SUCCESS:
        for callback in embed.get("callbacks") or []:
            out += _apply(msg, callback, (outcome.value,), lineage)
        rest = list(embed.get("chain") or [])
        if rest:  # the next step is last
            out += _apply(msg, rest.pop(), (outcome.value,), lineage, rest)
    else:
        cause = outcome.exc or _cause(msg, outcome)
        if outcome.status == TaskState.FAILURE:
            out += _errbacks(msg, cause, outcome.traceback or "", lineage)
        _stop_chain(msg, cause, outcome.traceback or "")
    if embed.get("chord") and msg.group:
        out += part_done(msg, outcome)
    return out


def _cause(msg: TaskMessage, outcome: execute.Outcome) -> BaseException:
    if outcome.status == TaskState.REVOKED:
        why = outcome.error or "by request"
        return TaskRevokedError(f"Task {msg.name}[{msg.id}] was revoked ({why})")
    return TaskRevokedError(f"Task {msg.name}[{msg.id}] was rejected: {outcome.error}")


def _apply(msg: TaskMessage, sig: Mapping[str, Any], args: Sequence[Any],
           lineage: Mapping[str, str], chain_rest: list[dict[str, Any]] | None = None
           ) -> list[Outgoing]:
    """The messages of ``sig`` called with ``args`` before its own."""
    from . import canvas

    try:
        call = canvas.signature(sig).clone(args)
        call.freeze()
        return call.messages(chain_rest, lineage)
    except (TypeError, ValueError, KeyError) as exc:
        # Not publishable (e.g. a return value JSON cannot carry): stored against the step
        # that cannot run, so whoever waits for it hears why rather than waiting forever.
        logger.error("Task %s[%s]: what follows it cannot be sent: %s", msg.name, msg.id, exc)
        step_id = (sig.get("options") or {}).get("task_id")
        if step_id:
            _not_run(step_id, str(sig.get("task")), msg, exc, "")
        return []


def _takes_request(task: Task[Any, Any]) -> bool:
    # As Celery decides: an errback taking more than one positional argument is called with
    # (request, exc, traceback) where the task failed; one taking only the id is sent.
    params = list(inspect.signature(task.run).parameters.values())[1 if task.bind else 0:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > 1 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _errbacks(msg: TaskMessage, exc: BaseException, traceback: str,
              lineage: Mapping[str, str]) -> list[Outgoing]:
    from . import canvas

    out: list[Outgoing] = []
    for errback in msg.embed.get("errbacks") or []:
        sig = canvas.signature(errback)
        task = registry.find(sig.name)
        if task is not None and _takes_request(task):
            try:
                task(execute.request_for(msg), exc, traceback, *sig.args, **sig.kwargs)
            except Exception:  # noqa: BLE001 - one errback's failure must not stop the rest
                logger.exception("Errback %s of task %s[%s] failed", sig.name, msg.name, msg.id)
            continue
        out += _apply(msg, errback, (msg.id,), lineage)
    return out


def _step_ids(sig: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task id, name) of the results a chain step's caller could wait for."""
    from . import canvas

    step = canvas.signature(sig)
    if isinstance(step, canvas.chord):
        return _step_ids(step.body)
    if isinstance(step, canvas.group | canvas.chain):
        return [pair for member in step.tasks for pair in _step_ids(member)]
    return [(step.id, step.name)] if step.id else []


def _stop_chain(msg: TaskMessage, cause: BaseException, traceback: str) -> None:
    """Store ``cause`` against every step after ``msg`` (so waiting for the chain's result
    raises it, as Celery does), except those of tasks that keep nothing."""
    note = (f"Not run: {msg.name}[{msg.id}], before it in the chain, ended with "
            f"{type(cause).__name__}: {cause}\n")
    for step in msg.embed.get("chain") or []:
        for task_id, name in _step_ids(step):
            task = registry.find(name)
            if task is not None and execute.mode_for(task) == "none":
                continue
            _not_run(task_id, name, msg, cause, note + traceback)


def _not_run(task_id: str, name: str, after: TaskMessage, exc: BaseException,
             traceback: str) -> None:
    """Store ``exc`` against a task that will not run because of how ``after`` ended."""
    _store_failure(TaskMessage(id=task_id, name=name, args=[], kwargs={},
                               root_id=after.root_id or after.id, parent_id=after.id),
                   exc, traceback)


def _store_failure(msg: TaskMessage, exc: BaseException, traceback: str) -> None:
    execute.store(msg, TaskState.FAILURE, result=execute.exception_info(exc),
                  traceback=traceback)


# -- groups and chords ---------------------------------------------------------------------
def record(group_id: str, task_ids: list[str], canvas: dict[str, Any],
           body: dict[str, Any] | None = None) -> None:
    """Write the row of a group or chord before its members are sent (a chord's members
    count themselves against it; the admin sends a group again from it)."""
    from .models import TaskGroup

    # One statement; a task run again re-records the group its chain step sends.
    fields = {"size": len(task_ids), "task_ids": task_ids, "canvas": canvas, "body": body,
              "body_id": (body or {}).get("options", {}).get("task_id") or ""}
    TaskGroup.objects.bulk_create([TaskGroup(group_id=group_id, **fields)],
                                  update_conflicts=True, unique_fields=["group_id"],
                                  update_fields=list(fields))


def part_done(msg: TaskMessage, outcome: execute.Outcome) -> list[Outgoing]:
    """A chord's member ended: send the body once every member succeeded, or fail it (and
    run its errbacks) at the first member that did not. Exactly once however many workers
    finish members at the same time, and again only for the member that sent it when that
    member is delivered again (its worker died before acknowledging it)."""
    from .models import TaskGroup, TaskResult

    group_id = str(msg.group)
    with transaction.atomic():
        # An UPDATE first: it takes the row's lock on PostgreSQL and the write lock on
        # SQLite, so members ending at once on different workers are counted one by one
        # (each then sees the others' stored results).
        if not TaskGroup.objects.filter(group_id=group_id).update(size=F("size")):
            logger.error("Task %s[%s] is a member of chord %s, which is not known here (its "
                         "row is missing: sent by another client, or pruned): its body cannot "
                         "be sent", msg.name, msg.id, group_id)
            return []
        row = TaskGroup.objects.only("size", "body_id", "body", "fired_by", "results").get(
            group_id=group_id)
        if row.fired_by:
            # Sent already; the member that sent it is run again only when its worker died
            # before acknowledging it, maybe before publishing the body: send it again.
            if row.fired_by == msg.id:
                return _fire(row, msg, outcome)
            if outcome.status == TaskState.SUCCESS and row.results is not None:
                _forget_members([msg.id])  # its value went to the body with the others
            return []
        if outcome.status == TaskState.SUCCESS:
            finished = TaskResult.objects.filter(group_id=group_id,
                                                 status=TaskState.SUCCESS).count()
            if finished < row.size:
                return []
        row.fired_by = msg.id
        row.date_done = timezone.now()
        out = _fire(row, msg, outcome)
        row.save(update_fields=["fired_by", "date_done", "results"])
    return out


def _fire(row: TaskGroup, msg: TaskMessage, outcome: execute.Outcome) -> list[Outgoing]:
    from . import canvas
    from .models import TaskGroup, TaskResult

    assert row.body is not None  # only a chord's members end up here
    body = canvas.signature(row.body)
    lineage = {"parent_id": msg.id, "root_id": msg.root_id or msg.id}
    failure: BaseException | None = None
    if outcome.status != TaskState.SUCCESS:
        cause = outcome.exc or _cause(msg, outcome)
        failure = ChordError(f"Dependency {msg.name}[{msg.id}] ended with "
                             f"{type(cause).__name__}: {cause}")
    elif row.results is None:
        ids = list(TaskGroup.objects.values_list("task_ids", flat=True).get(pk=row.pk))
        stored = dict(TaskResult.objects.filter(task_id__in=ids, status=TaskState.SUCCESS)
                      .values_list("task_id", "result"))
        missing = [task_id for task_id in ids if task_id not in stored]
        if missing:
            failure = ChordError(f"The results of {len(missing)} member(s) are missing "
                                 f"(first: {missing[0]}): deleted before the body was sent")
        else:
            row.results = [stored[task_id] for task_id in ids]
            _forget_members(ids)
    if failure is None:
        return _apply(msg, body, (row.results,), lineage)
    logger.error("Chord %s: its body %s[%s] is not run: %s", msg.group, body.name, body.id,
                 failure)
    failed = TaskMessage(
        id=str(body.id), name=body.name, args=body.args, kwargs=body.kwargs,
        root_id=lineage["root_id"], parent_id=msg.id, group=body.options.get("group_id"),
        embed={"callbacks": None, "errbacks": body.options.get("link_error"),
               "chain": body.options.get("chain"), "chord": body.options.get("chord")})
    _store_failure(failed, failure, "")
    return follow_ups(failed, execute.Outcome(TaskState.FAILURE, exc=failure))


def _forget_members(ids: list[str]) -> None:
    """Delete the members' rows kept only for the chord: the body has their results now."""
    from .models import TaskResult

    names = set(TaskResult.objects.filter(task_id__in=ids).values_list("task_name", flat=True))
    # A task this process does not know may keep its results: those stay.
    transient = [name for name in names if (task := registry.find(name)) is not None
                 and execute.mode_for(task) != "all"]
    TaskResult.objects.filter(task_id__in=ids, task_name__in=transient,
                              status=TaskState.SUCCESS).delete()
