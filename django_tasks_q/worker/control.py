"""Processes: remote control: the worker's answers to ``taskctl``, ``celery inspect`` and Flower.

Commands arrive on the worker's own queue ``<hostname>.celery.pidbox`` (kombu's pidbox, declared
as Celery declares it), so Celery's tools and ours reach the same workers. Each handler takes the
``Control`` as its state and returns something JSON can carry, in the shape Celery's worker
gives, since Flower and ``celery inspect`` read them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from django.db import DatabaseError

from .. import broker, conf, registry
from .state import Watcher

if TYPE_CHECKING:
    from .consumer import Consumer
    from .pool import Job

logger = logging.getLogger("django_tasks_q.worker")

Handler = Callable[..., Any]
H = TypeVar("H", bound=Handler)
HANDLERS: dict[str, Handler] = {}
#: Broker connection details never sent in a reply (``stats``).
SECRET_WORDS = ("password", "secret", "token", "key")


@overload
def command(fn: H, *, name: str = "") -> H: ...
@overload
def command(fn: None = None, *, name: str = "") -> Callable[[H], H]: ...


def command(fn: H | None = None, *, name: str = "") -> H | Callable[[H], H]:
    """Register ``fn`` as the handler of the remote-control command ``name`` (default: the
    function's own name); as ``@command`` or ``@command(name=…)``."""
    def register(handler: H) -> H:
        HANDLERS[name or handler.__name__] = handler
        return handler

    return register(fn) if fn is not None else register


class Control(Watcher):
    """Listens on the worker's pidbox queue for as long as the consumer is connected."""

    def __init__(self, consumer: Consumer, pool: str, prefetch: int) -> None:
        self.consumer = consumer
        self.pool = pool
        self.prefetch = prefetch
        self.started_at = time.time()
        self.node: Any = None
        self.listener: Any = None

    def attach(self, hub: Any, connection: Any) -> None:
        # A channel of its own: a command that fails never closes the one tasks arrive on.
        node = broker.mailbox(connection).Node(self.consumer.hostname, state=self,
                                               handlers=HANDLERS)
        node.channel = connection.channel()
        self.listener = node.listen(callback=self._on_command)
        self.node = node

    def _on_command(self, body: Any, message: Any) -> None:
        try:
            self.node.handle_message(body, message)
        except Exception:  # noqa: BLE001 - a malformed command must not stop the worker
            logger.exception("Could not handle remote-control message %r", body)

    def close(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                self.listener.cancel()
            self.listener = None


def _time_start(job: Job) -> float | None:
    # Jobs carry a monotonic start; replies give wall-clock time, as Celery's do.
    return time.time() - (time.monotonic() - job.started) if job.started else None


def request_info(job: Job, acknowledged: bool) -> dict[str, Any]:
    """One task as Celery's worker describes a request (``inspect active``/``reserved``)."""
    msg = job.msg
    return {
        "id": msg.id, "name": msg.name, "args": msg.args, "kwargs": msg.kwargs,
        "type": msg.name, "hostname": None, "time_start": _time_start(job),
        "acknowledged": acknowledged, "worker_pid": job.pid,
        "delivery_info": {"exchange": "", "routing_key": msg.queue, "priority": msg.priority,
                          "redelivered": bool((job.message.delivery_info or {}).get(
                              "redelivered")) if job.message is not None else False},
        "eta": msg.eta.isoformat() if msg.eta else None, "retries": msg.retries,
    }


def _info(state: Control, job: Job, acknowledged: bool) -> dict[str, Any]:
    info = request_info(job, acknowledged)
    info["hostname"] = state.consumer.hostname
    return info


@command
def ping(state: Control, **kwargs: Any) -> dict[str, str]:
    """Answer: the worker is alive and its event loop is turning."""
    return {"ok": "pong"}


@command
def active(state: Control, **kwargs: Any) -> list[dict[str, Any]]:
    """The tasks running now."""
    return [_info(state, job, True) for job in state.consumer.pool.active()]


@command
def reserved(state: Control, **kwargs: Any) -> list[dict[str, Any]]:
    """Tasks received and waiting for a free pool slot."""
    return [_info(state, job, False) for job in state.consumer.buffer]


@command
def scheduled(state: Control, **kwargs: Any) -> list[dict[str, Any]]:
    """Tasks held in memory until their eta (those due much later are parked in the database)."""
    return [{"eta": job.msg.eta.isoformat() if job.msg.eta else None,
             "priority": job.msg.priority, "request": _info(state, job, False)}
            for _, _, job in sorted(state.consumer.delayed)]


@command
def registered(state: Control, **kwargs: Any) -> list[str]:
    """The names of the tasks this worker can run."""
    return sorted(registry.names())


@command
def revoked(state: Control, **kwargs: Any) -> list[str]:
    """The ids of revoked tasks this worker knows of."""
    return sorted(state.consumer.revoked)


@command
def hello(state: Control, from_node: str = "", revoked: Any = None,
          **kwargs: Any) -> dict[str, Any] | None:
    """A Celery worker starting on the same broker asks its peers which task ids are revoked
    (Celery's "mingle"): take its ids, and answer with ours, as Celery's workers answer."""
    if from_node == state.consumer.hostname:
        return None
    if revoked:
        logger.info("Sync with %s: %d revoked task id(s) received", from_node, len(revoked))
        state.consumer.revoked.update(str(task_id) for task_id in revoked)
    # Celery keeps revoked ids with the time they were revoked; no logical clock is kept here.
    return {"revoked": dict.fromkeys(state.consumer.revoked, time.time()), "clock": 0}


@command
def revoke(state: Control, task_id: str | list[str], terminate: bool = False,
           signal: str | None = None, **kwargs: Any) -> dict[str, str]:
    """Run none of ``task_id`` (one id or a list); with ``terminate``, kill those running.

    The revocation is also written to the result store, so every worker, and any started
    later, honours it (the store is what workers read revocations from)."""
    ids = [task_id] if isinstance(task_id, str) else list(task_id)
    from ..results import AsyncResult  # the api layer: imported on use, once Django is set up

    for one in ids:
        try:
            AsyncResult(one).revoke(terminate=terminate)
        except DatabaseError as exc:
            logger.warning("Could not store the revocation of %s (%s); this worker honours it "
                           "until it restarts", one, exc)
    killed = state.consumer.revoke(set(ids), terminate=terminate)
    if terminate:
        return {"ok": f"terminate: {', '.join(killed)}" if killed else "terminate: tasks unknown"}
    return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}


@command
def active_queues(state: Control, **kwargs: Any) -> list[dict[str, Any]]:
    """The queues this worker consumes from, as kombu describes them."""
    return [dict(broker.configured_queue(name).as_dict(recurse=True))
            for name in state.consumer.queues]


@command
def stats(state: Control, **kwargs: Any) -> dict[str, Any]:
    """Counts, pool, broker and resource use, in the shape of Celery's ``inspect stats``."""
    consumer = state.consumer
    pool = consumer.pool
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "total": dict(consumer.tally.total),
        "pid": os.getpid(),
        "clock": str(state.node.mailbox.clock.value) if state.node is not None else "0",
        "uptime": int(time.time() - state.started_at),
        "pool": {
            "implementation": f"django_tasks_q:{state.pool}",
            "max-concurrency": pool.size,
            "min-concurrency": pool.min_size,
            "processes": sorted(pid for pid in pool.pids()),
            "max-tasks-per-child": pool.max_tasks_per_child or "N/A",
            "put-guarded-by-semaphore": False,
            "timeouts": [consumer.soft_time_limit or 0, consumer.time_limit or 0],
        },
        "broker": _broker_info(consumer.connection),
        "prefetch_count": state.prefetch,
        "rusage": {"utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss": usage.ru_maxrss,
                   "minflt": usage.ru_minflt, "majflt": usage.ru_majflt,
                   "nvcsw": usage.ru_nvcsw, "nivcsw": usage.ru_nivcsw},
        "processed": consumer.tally.processed,
        "failed": consumer.tally.failed,
    }


def _broker_info(connection: Any) -> dict[str, Any]:
    if connection is None:
        return {}
    info = dict(connection.info())
    info.pop("password", None)
    options = info.get("transport_options") or {}
    info["transport_options"] = {k: v for k, v in options.items()
                                 if not any(word in k.lower() for word in SECRET_WORDS)}
    return {k: v for k, v in info.items() if _plain(v)}


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)


@command(name="conf")
def conf_(state: Control, with_defaults: bool = False, **kwargs: Any) -> dict[str, Any]:
    """The worker's ``TASKS_Q`` settings (the broker URL without its password)."""
    cfg = conf.get()
    out: dict[str, Any] = {}
    for key in conf.DEFAULTS:
        if key == "BROKER_OPTIONS":
            continue
        value = getattr(cfg, key)
        if key == "BROKER_URL":
            value = broker.safe_url()
        elif isinstance(value, timedelta):
            value = value.total_seconds()
        out[key] = value if _plain(value) else repr(value)
    return out


def _set_events(state: Control, on: bool) -> dict[str, str]:
    events = state.consumer.events
    word = "enabled" if on else "disabled"
    if events is None:
        return {"error": f"task events cannot be {word} on this worker"}
    if events.enabled == on:
        return {"ok": f"task events already {word}"}
    if not (events.enable() if on else events.disable()):
        return {"error": f"task events cannot be {word} on {broker.safe_url()}"}
    return {"ok": f"task events {word}"}


@command
def enable_events(state: Control, **kwargs: Any) -> dict[str, str]:
    """Start sending task events (as ``-E`` does)."""
    return _set_events(state, True)


@command
def heartbeat(state: Control, **kwargs: Any) -> None:
    """Send a worker-heartbeat event now: event receivers (Flower, ``celery events``) ask for
    one when they start. Nothing is replied, as with Celery."""
    if state.consumer.events is not None:
        state.consumer.events.heartbeat()


@command
def disable_events(state: Control, **kwargs: Any) -> dict[str, str]:
    """Stop sending task events."""
    return _set_events(state, False)
