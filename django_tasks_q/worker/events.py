"""Processes: monitoring events as Celery sends them (``taskworker -E``), for Flower and
``celery events``."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kombu.entity import Exchange
from kombu.messaging import Producer

from .. import __version__, broker, conf, execute
from ..states import TaskState
from .consumer import DELIVERIES_HEADER
from .pool import LOST
from .state import Watcher

if TYPE_CHECKING:
    from .pool import Job

logger = logging.getLogger("django_tasks_q.worker")

#: Celery's event exchange; monitors bind their own queues to it.
EXCHANGE = "celeryev"
#: Seconds between worker-heartbeat events (Celery's default; monitors expect it).
HEARTBEAT_INTERVAL = 2.0
#: Task events sent in one message at most (Celery's buffer_limit).
BUFFER_LIMIT = 24
#: Seconds a task event may wait for others to share its message.
FLUSH_AFTER = 0.1
#: Transports a monitor cannot subscribe to (Celery sends no events on SQL brokers either).
UNSUPPORTED = frozenset({"sql"})
KILL_SIGNAL = 9  # what the prefork pool terminates a revoked task's child with
SOFTWARE = {"sw_ident": "django-tasks-q", "sw_ver": __version__, "sw_sys": platform.system()}


def exchange_for(connection: Any) -> Exchange:
    """``celeryev`` as Celery declares it: topic, but fanout on Redis (where kombu's topic
    exchanges need a binding lookup per message and Celery's receivers subscribe to fanout)."""
    kind = "fanout" if connection.transport.driver_type == "redis" else "topic"
    return Exchange(EXCHANGE, type=kind)


def utcoffset() -> float:
    """Hours this host is behind UTC, as Celery computes it (receivers correct timestamps)."""
    if time.localtime().tm_isdst:
        return time.altzone / 3600
    return time.timezone / 3600


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded up to hundredths (as Celery reports)."""
    return [math.ceil(load * 100) / 100 for load in os.getloadavg()]


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


class Events(Watcher):
    """Publishes Celery's task and worker events on the consumer's connection while enabled.

    Disabled, every hook returns after one attribute check. Task events travel together, as
    Celery's worker sends them (a list body, routing key ``task.multi``): those of up to
    ``FLUSH_AFTER`` seconds, ``BUFFER_LIMIT`` at most, so that a busy worker publishes a few
    messages a second rather than one per event. Worker events go one by one. An event that
    cannot be published is dropped.
    """

    def __init__(self, hostname: str, enabled: bool = False,
                 counts: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 interval: float = HEARTBEAT_INTERVAL) -> None:
        self.hostname = hostname
        #: Publishing now (``-E``, or ``enable_events`` from a monitor such as Flower).
        self.enabled = enabled
        self.counts = counts  # () -> (tasks running now, tasks finished since start)
        self.interval = interval
        self.pid = os.getpid()
        self.clock = 0  # Lamport clock: monitors order events of one worker by it
        self._headers = {"hostname": hostname}
        self._hub: Any = None
        self._connection: Any = None
        self._channel: Any = None
        self._producer: Producer | None = None
        self._timer: Any = None
        self._buffer: list[dict[str, Any]] = []
        self._flush_due = False  # a timer will flush the buffer
        self._supported = True
        self._announced = False  # events being on was logged at the first connection

    # -- switching on and off ------------------------------------------------------------------
    def enable(self) -> bool:
        """Start publishing (``enable_events``); False when it was on already or cannot be."""
        if self.enabled or not self._supported:
            return False
        self.enabled = True
        if self._hub is not None:
            self._start()
        logger.info("Events enabled: publishing to the %r exchange", EXCHANGE)
        return True

    def disable(self) -> bool:
        """Stop publishing (``disable_events``), saying worker-offline last; False when off."""
        if not self.enabled:
            return False
        self._stop()
        self.enabled = False
        logger.info("Events disabled")
        return True

    def heartbeat(self) -> None:
        """Send a worker-heartbeat now (the remote-control command ``heartbeat``, which
        Celery's event receivers broadcast when they start)."""
        if self.enabled:
            self._worker("worker-heartbeat")

    def attach(self, hub: Any, connection: Any) -> None:
        self._hub, self._connection = hub, connection
        self._timer, self._flush_due = None, False  # timers died with the previous event loop
        self._close_channel()
        if connection.transport.driver_type in UNSUPPORTED:
            if self._supported and self.enabled:
                logger.warning("Events (-E) are not sent on %s: monitors such as Flower read "
                               "them from Redis or RabbitMQ; use one of those as the broker",
                               broker.safe_url())
            self._supported = self.enabled = False
            return
        if self.enabled:
            self._start()
            if not self._announced:
                logger.info("Events on: publishing to the %r exchange", EXCHANGE)
        self._announced = True

    def close(self) -> None:
        if not self.enabled:
            return
        self._stop(fresh=True)
        self._hub = self._connection = None

    def _start(self) -> None:
        """Open a producer on the current connection, say worker-online, start heartbeats."""
        if not self._open(self._connection):
            return
        self._worker("worker-online")
        # On RabbitMQ, deliveries are handled while a call waits for its reply (opening the
        # channel above): the events of those tasks waited in the buffer.
        self.flush()
        self._timer = self._hub.call_repeatedly(self.interval, self._worker, "worker-heartbeat")

    def _stop(self, fresh: bool = False) -> None:
        """Stop heartbeats and say worker-offline, on a connection of its own when ``fresh``
        (at shutdown the consumer's is closed already)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if fresh:
            self._close_channel()
            with contextlib.suppress(Exception), broker.connection() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0.1)
                if self._open(conn):
                    self.flush()
                    self._worker("worker-offline")
                self._close_channel()
            return
        self.flush()
        self._worker("worker-offline")
        self._close_channel()

    def _open(self, connection: Any) -> bool:
        try:
            channel = connection.channel()
            # A confirm per event would cost a round trip each; events are fire-and-forget
            # (py-amqp switches a channel to confirms by this instance attribute).
            vars(channel).pop("basic_publish", None)
            exchange = exchange_for(connection)
            exchange(channel).declare()
        except Exception as exc:  # noqa: BLE001 - no events is better than no worker
            logger.warning("Cannot publish events to the %r exchange on %s (%s: %s); none "
                           "are sent until the worker reconnects", EXCHANGE, broker.safe_url(),
                           type(exc).__name__, exc)
            return False
        self._channel = channel
        self._producer = Producer(channel, exchange=exchange, serializer="json",
                                  auto_declare=False)
        return True

    def _close_channel(self) -> None:
        channel, self._channel, self._producer = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()

    # -- publishing ---------------------------------------------------------------------------
    def _event(self, type_: str, fields: dict[str, Any]) -> dict[str, Any]:
        self.clock += 1
        return {"hostname": self.hostname, "utcoffset": utcoffset(), "pid": self.pid,
                "clock": self.clock, **fields, "timestamp": time.time(), "type": type_}

    def _publish(self, body: Any, routing_key: str) -> None:
        producer = self._producer
        if producer is None:
            return
        try:
            producer.publish(body, routing_key=routing_key, headers=self._headers,
                             delivery_mode=1, retry=False)
        except Exception as exc:  # noqa: BLE001 - a monitor's loss, never the worker's
            logger.debug("Dropped event(s) %s: %s: %s", routing_key, type(exc).__name__, exc)

    def _worker(self, type_: str) -> None:
        active, processed = self.counts()
        self._publish(self._event(type_, {
            "freq": self.interval, "active": active, "processed": processed,
            "loadavg": load_average(), **SOFTWARE}), type_.replace("-", "."))

    def _task(self, type_: str, fields: dict[str, Any]) -> None:
        buffer = self._buffer
        buffer.append(self._event(type_, fields))
        if len(buffer) >= BUFFER_LIMIT:
            self.flush()
        elif not self._flush_due and self._hub is not None:
            self._flush_due = True
            self._hub.call_later(FLUSH_AFTER, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        """Publish the task events waiting in the buffer."""
        events, self._buffer = self._buffer, []
        if not events:
            return
        if self._producer is None:
            logger.debug("Dropped %d task event(s): no connection to publish them on",
                         len(events))
            return
        self._publish(events, "task.multi")

    # -- the task's way through the worker -------------------------------------------------------
    def received(self, job: Job) -> None:
        if not self.enabled:
            return
        msg = job.msg
        self._task("task-received", {
            "uuid": msg.id, "name": msg.name, "args": execute.short_repr(msg.args),
            "kwargs": execute.short_repr(msg.kwargs), "root_id": msg.root_id,
            "parent_id": msg.parent_id, "retries": msg.retries, "eta": _iso(msg.eta),
            "expires": _iso(msg.expires)})

    def started(self, job: Job) -> None:
        if not self.enabled:
            return
        self._task("task-started", {"uuid": job.msg.id})

    def finished(self, job: Job, outcome: execute.Outcome) -> None:
        if not self.enabled:
            return
        status, uuid = outcome.status, job.msg.id
        if status == TaskState.SUCCESS:
            self._task("task-succeeded", {"uuid": uuid, "result": outcome.result_repr,
                                          "runtime": outcome.runtime})
        elif status == TaskState.FAILURE:
            self._task("task-failed", {"uuid": uuid,
                                       "exception": outcome.exc_repr or outcome.error,
                                       "traceback": outcome.traceback or ""})
        elif status == TaskState.RETRY:
            self._task("task-retried", {"uuid": uuid,
                                        "exception": outcome.exc_repr or outcome.error,
                                        "traceback": outcome.traceback or ""})
        elif status == TaskState.REVOKED:  # expired before it ran
            self._task("task-revoked", {"uuid": uuid, "terminated": False, "signum": None,
                                        "expired": True})
        elif status in (execute.REJECT, execute.REQUEUE):
            self._task("task-rejected", {"uuid": uuid, "requeue": status == execute.REQUEUE})
        elif status == LOST and not job.revoked:  # revoked ones are told of by revoked()
            self._lost(job, outcome)

    def _lost(self, job: Job, outcome: execute.Outcome) -> None:
        # As the consumer decides: a time limit or the last delivery fails the task; otherwise
        # it is delivered again and its next task-received says so.
        if job.timed_out:
            exception = f"TimeLimitExceeded('hard time limit ({job.timed_out:g}s) exceeded')"
        elif int(job.msg.headers.get(DELIVERIES_HEADER) or 1) >= conf.get().MAX_DELIVERIES:
            exception = f"WorkerLostError({outcome.error!r})"
        else:
            return
        self._task("task-failed", {"uuid": job.msg.id, "exception": exception,
                                   "traceback": ""})

    def revoked(self, job: Job, terminated: bool) -> None:
        if not self.enabled:
            return
        self._task("task-revoked", {"uuid": job.msg.id, "terminated": terminated,
                                    "signum": KILL_SIGNAL if terminated else None,
                                    "expired": False})
