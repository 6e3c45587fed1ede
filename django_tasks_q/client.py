"""Client: checks arguments, routes and publishes task messages (on commit inside a transaction)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import broker, conf, message, registry, signals
from .exceptions import TasksQError
from .execute import current_request, mode_for

if TYPE_CHECKING:
    from .results import AsyncResult, EagerResult
    from .task import Task


#: Takes messages in place of the broker while ``django_tasks_q.testing.capture_tasks()`` is
#: active: called with (body, headers, queue, priority, the time the task was sent).
Capture = Callable[[str, dict[str, Any], str, int | None, datetime], None]
capture: Capture | None = None


class UnknownQueue(TasksQError, ValueError):
    """A task was sent to a queue that ``TASKS_Q["QUEUES"]`` does not list."""


def _why_not_json(value: Any) -> str | None:
    """Why ``value`` (searched recursively) cannot travel as JSON, or None when it can."""
    from django.db.models import Model, QuerySet

    if isinstance(value, Model):
        return (f"a {type(value).__name__} model instance; pass its primary key instead "
                f"(.pk = {value.pk!r}) and load it inside the task")
    if isinstance(value, QuerySet):
        return ("a QuerySet; pass a list of primary keys instead "
                "(list(qs.values_list('pk', flat=True))) and query inside the task")
    if isinstance(value, (list, tuple)):
        return next((r for r in map(_why_not_json, value) if r), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"a dict with a {type(key).__name__} key; JSON keys must be strings"
            reason = _why_not_json(item)
            if reason:
                return reason
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return (f"a {type(value).__module__}.{type(value).__qualname__}, which JSON cannot carry; "
            f"pass plain data (str, int, float, bool, None, list, dict)")


def encode_body(name: str, args: list[Any], kwargs: dict[str, Any],
                embed: dict[str, Any] | None = None) -> str:
    """The JSON body ``[args, kwargs, embed]``; a clear ``TypeError`` names any bad argument."""
    try:
        return message.to_json([args, kwargs, embed or message.EMBED])
    except (TypeError, ValueError):
        pass
    check_json(name, args, kwargs)
    raise TypeError(f"Cannot send task {name}: the arguments of a task that follows it (a "
                    f"chain step, link or chord body) cannot be encoded as JSON.")


def check_json(name: str, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A ``TypeError`` naming the first argument of task ``name`` that JSON cannot carry."""
    where = [(f"argument {i}", v) for i, v in enumerate(args)]
    where += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in where:
        reason = _why_not_json(value)
        if reason:
            raise TypeError(f"Cannot send task {name}: {label} is {reason}.")
    try:
        message.to_json([args, kwargs])
    except (TypeError, ValueError):
        raise TypeError(f"Cannot send task {name}: its arguments cannot be encoded as JSON."
                        ) from None


def route(name: str, task_queue: str | None, queue: str | None,
          priority: int | None) -> tuple[str, int | None]:
    """(queue, priority): explicit option, then ``ROUTES``, then the task's own, then default."""
    cfg = conf.get()
    if queue is None:
        routed = cfg.ROUTES.get(name)
        if routed is None:
            routed = next((v for k, v in cfg.ROUTES.items() if fnmatchcase(name, k)), None)
        if isinstance(routed, dict):
            queue = routed.get("queue")
            priority = routed.get("priority") if priority is None else priority
        elif routed is not None:
            queue = str(routed)
    queue = queue or task_queue or cfg.DEFAULT_QUEUE
    if cfg.queues_explicit and queue not in cfg.QUEUES:
        raise UnknownQueue(f"Cannot send task {name} to queue {queue!r}: it is not in "
                           f"TASKS_Q['QUEUES'] ({', '.join(cfg.QUEUES)}); add it there or "
                           f"route the task to one of those")
    return queue, priority


def check_priority(name: str, priority: Any) -> int | None:
    """``priority`` if it is one: an int from 0 (lowest, the default) to 9 (highest), or None."""
    if priority is None:
        return None
    if (isinstance(priority, bool) or not isinstance(priority, int)
            or not 0 <= priority <= broker.MAX_PRIORITY):
        raise ValueError(f"Cannot send task {name}: priority must be an int from 0 (lowest, the "
                         f"default) to {broker.MAX_PRIORITY} (highest), not {priority!r}")
    return priority


def _when(countdown: float | None, eta: datetime | None) -> datetime | None:
    if countdown is not None:
        return datetime.now(UTC) + timedelta(seconds=float(countdown))
    if eta is not None and eta.tzinfo is None:
        raise ValueError("eta must be timezone-aware (use django.utils.timezone.now() + …)")
    return eta


def _expiry(expires: float | datetime | timedelta | None) -> datetime | None:
    if expires is None or isinstance(expires, datetime):
        return expires
    seconds = expires.total_seconds() if isinstance(expires, timedelta) else float(expires)
    return datetime.now(UTC) + timedelta(seconds=seconds)


#: A message ready to publish: the message and its encoded body.
Outgoing = tuple[message.TaskMessage, str]


def build(name: str, task: Task[Any, Any] | None, args: list[Any] | tuple[Any, ...] | None,
          kwargs: dict[str, Any] | None, *, countdown: float | None = None,
          eta: datetime | None = None, expires: float | datetime | timedelta | None = None,
          queue: str | None = None, priority: int | None = None, task_id: str | None = None,
          headers: dict[str, Any] | None = None, link: Any = None, link_error: Any = None,
          chain: list[dict[str, Any]] | None = None, chord: dict[str, Any] | None = None,
          group_id: str | None = None, group_index: int | None = None,
          root_id: str | None = None, parent_id: str | None = None) -> Outgoing:
    """Build and check one message for task ``name`` (``task`` when this process knows it):
    arguments, route, priority, and the workflow it is part of (Celery's ``embed``)."""
    args, kwargs = list(args or ()), dict(kwargs or {})
    embed = {"callbacks": _signatures(link), "errbacks": _signatures(link_error),
             "chain": chain or None, "chord": chord}
    body = encode_body(name, args, kwargs, embed)
    queue, priority = route(name, task.queue if task else None, queue, priority)
    if priority is None and task is not None:
        priority = task.priority
    parent = current_request()
    if parent is not None and parent_id is None:
        parent_id, root_id = parent.id, root_id or parent.root_id or parent.id
    if expires is None and task is not None:
        expires = task.expires
    msg = message.TaskMessage(
        id=task_id or message.new_id(), name=name, args=args, kwargs=kwargs,
        eta=_when(countdown, eta), expires=_expiry(expires),
        time_limit=task.time_limit if task else None,
        soft_time_limit=task.soft_time_limit if task else None,
        parent_id=parent_id, root_id=root_id, group=group_id, group_index=group_index,
        # A group's members are kept for the group, whatever their task keeps.
        ignore_result=task is not None and group_id is None and mode_for(task) != "all",
        queue=queue, priority=check_priority(name, priority), headers=dict(headers or {}),
        embed=embed,
    )
    return msg, body


def _signatures(value: Any) -> list[dict[str, Any]] | None:
    """``link``/``link_error``: one signature or a list of them, as plain dicts."""
    if not value:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(item, dict) and "task" in item for item in items):
        raise TypeError(f"link and link_error take a signature (task.s(...)) or a list of "
                        f"them, not {value!r}")
    return [dict(item) for item in items]


def send(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any],
         **options: Any) -> AsyncResult:
    """Build, check and publish one message for ``task``; return its result handle at once."""
    msg, body = build(task.name, task, args, kwargs, **options)
    if runs_eagerly():
        return run_eager(task, msg)
    publish(msg, body, wait=False)
    return _async_result()(msg.id, task=task)


@functools.cache
def _async_result() -> type[AsyncResult]:
    """``results.AsyncResult``, imported once Django is set up (results imports the models)
    and kept: an import statement costs as much on every call."""
    from .results import AsyncResult

    return AsyncResult


def runs_eagerly() -> bool:
    """True when ``EAGER`` runs tasks as they are sent (not while a test captures them)."""
    return conf.get().EAGER and capture is None


#: While a workflow is applied in ``EAGER`` mode: the outcome of each task run inline, by id.
_eager_seen: ContextVar[dict[str, EagerResult] | None] = ContextVar("dtq_eager_seen",
                                                                    default=None)


@contextlib.contextmanager
def eager_outcomes() -> Iterator[dict[str, EagerResult]]:
    """Collect the outcome of every task run inline in the block, by task id."""
    seen: dict[str, EagerResult] = {}
    token = _eager_seen.set(seen)
    try:
        yield seen
    finally:
        _eager_seen.reset(token)


def run_eager(task: Task[Any, Any] | None, msg: message.TaskMessage) -> EagerResult:
    """Run ``msg`` inline, retries included (without waiting), then what follows it (chain
    steps, links, a chord's body), for ``EAGER`` mode."""
    from . import execute, results, states, workflow

    first: EagerResult | None = None
    pending = [(task, msg)]
    while pending:  # a loop, not recursion: a long chain must not exhaust the stack
        task, msg = pending.pop(0)
        while True:
            outcome = execute.run(msg, hostname="eager", eager=True)
            if outcome.status != states.TaskState.RETRY:
                break
            msg.retries += 1
        done = results.EagerResult(msg.id, task, outcome.status, value=outcome.value,
                                   exc=outcome.exc, traceback=outcome.traceback)
        first = first or done
        seen = _eager_seen.get()
        if seen is not None:
            seen[msg.id] = done
        for follow, body in workflow.follow_ups(msg, outcome):
            if runs_eagerly():
                pending.append((registry.find(follow.name), follow))
            else:
                publish(follow, body, defer=False)
    assert first is not None
    return first


def dispatch(outgoing: list[Outgoing]) -> None:
    """Send built messages: inline in ``EAGER`` mode, else published (on commit)."""
    for msg, body in outgoing:
        if runs_eagerly():
            run_eager(registry.find(msg.name), msg)
        else:
            publish(msg, body, wait=False)


def publish(msg: message.TaskMessage, body: str | None = None, defer: bool = True,
            wait: bool = True) -> None:
    """Publish ``msg`` now, or when the current transaction commits (``ENQUEUE_ON_COMMIT``;
    ``defer=False`` publishes now in any case). ``wait=False`` (a user's call) returns before
    RabbitMQ's confirm, which the end of the request or task collects (broker.Publisher)."""
    encoded, headers, properties = message.encode(msg, body)
    # A task sent while tests capture stays captured, even when its commit comes later.
    captured_by, sent_at = capture, datetime.now(UTC)

    def do_publish() -> None:
        # As Celery sends them: the body decoded, the default exchange routing by queue name.
        body_parts = (msg.args, msg.kwargs, msg.embed)
        signals.before_task_publish.send(
            sender=msg.name, body=body_parts, exchange="", routing_key=msg.queue,
            headers=headers, properties=properties, declare=[],
            retry_policy=broker.PUBLISH_RETRY_POLICY)
        sink = captured_by or capture
        if sink is not None:
            sink(encoded, headers, msg.queue, msg.priority, sent_at)
        else:
            broker.publisher().publish(encoded, headers, properties, msg.queue, msg.priority,
                                       wait=wait)
        signals.after_task_publish.send(sender=msg.name, body=body_parts, exchange="",
                                        routing_key=msg.queue, headers=headers)

    cfg = conf.get()
    # Captured messages never reach the database, so they wait for the commit on any broker.
    if (defer and cfg.ENQUEUE_ON_COMMIT and _in_transaction()
            and (captured_by is not None or not _in_same_database(cfg))):
        transaction.on_commit(do_publish)
    else:
        do_publish()


def _in_transaction() -> bool:
    """True inside the caller's ``transaction.atomic()`` on the default database."""
    conn = transaction.get_connection()
    # Django's TestCase wraps each test in atomic blocks of its own (marked _from_testcase):
    # code outside the test's own atomic() runs in autocommit in production, so it publishes
    # at once here too, rather than on a commit that never comes.
    return conn.in_atomic_block and (
        not conn.atomic_blocks
        or any(not getattr(block, "_from_testcase", False) for block in conn.atomic_blocks))


def _in_same_database(cfg: conf.Settings) -> bool:
    # On django:// over the default database the message row is written inside the caller's
    # transaction: it commits or rolls back with it, and no commit can happen without it.
    return (cfg.BROKER_URL.startswith("django://")
            and cfg.BROKER_OPTIONS.get("database", "default") == "default")


def send_task(name: str, args: list[Any] | tuple[Any, ...] | None = None,
              kwargs: dict[str, Any] | None = None, *, queue: str | None = None,
              priority: int | None = None, countdown: float | None = None,
              eta: datetime | None = None, task_id: str | None = None) -> AsyncResult:
    """Send a task by name, without importing its function (it may live in another service)."""
    msg, body = build(name, None, args, kwargs, queue=queue, priority=priority,
                      countdown=countdown, eta=eta, task_id=task_id)
    publish(msg, body, wait=False)
    return _async_result()(msg.id, task=registry.find(name))
