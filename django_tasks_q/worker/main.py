"""Processes: the worker's life: start the pool and consumer, handle signals, shut down."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from .. import broker, conf, registry, signals
from ..beat import Beat
from ..extensions import ActiveTask, WorkerExtension, extension_classes
from .child import drop_inherited_db_connections
from .consumer import Consumer
from .control import Control
from .events import Events
from .extensions import Extensions
from .heartbeat import Heartbeat
from .pool import POOLS
from .timer import Timer

logger = logging.getLogger("django_tasks_q.worker")


@dataclass
class WorkerOptions:
    """What ``taskworker`` was asked for."""

    queues: list[str]
    concurrency: int
    pool: str = "prefork"
    hostname: str = ""
    prefetch_multiplier: int = 4
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None  # KiB
    time_limit: float | None = None
    soft_time_limit: float | None = None
    autoscale: tuple[int, int] | None = None  # (MAX, MIN) prefork children; wins over concurrency
    beat: bool = False  # run taskbeat in a process of its own beside the worker (-B)
    events: bool = False  # send Celery's monitoring events from the start (-E)
    #: The worker extensions to run; None: those of WORKER_EXTENSIONS, then those registered.
    extensions: list[type[WorkerExtension]] | None = None
    #: Each extension's option values (taskworker's command line); one left out gets the
    #: defaults of the options it declares.
    extension_options: dict[type[WorkerExtension], dict[str, Any]] = field(default_factory=dict)


def default_hostname() -> str:
    """``worker.<pid>@<host>``: unique per process, readable in logs and results."""
    return f"worker.{os.getpid()}@{socket.gethostname()}"


class Worker:
    """One worker process tree: a consumer in this process and a pool of executors.

    What worker extensions may use: ``hostname``, ``options`` (``WorkerOptions``), ``pool``
    (``pool.size``, ``pool.pids()``), ``timer`` and ``active_tasks()``.
    """

    def __init__(self, options: WorkerOptions) -> None:
        if options.pool not in POOLS:
            raise ValueError(f"Unknown pool {options.pool!r}; use one of {', '.join(POOLS)}")
        if options.autoscale is not None:
            check_autoscale(options.autoscale, options.pool)
        elif options.concurrency < 1:
            raise ValueError("Concurrency must be at least 1")
        if options.pool == "prefork" and conf.get().BROKER_URL.startswith("memory://"):
            raise ValueError("The memory:// broker lives inside one process, so forked pool "
                             "children would each see their own copy of it; use -P solo or "
                             "-P threads with memory://, or a real broker for prefork")
        self.options = options
        self.hostname = options.hostname or default_hostname()
        size, least = options.autoscale or (
            (1, 1) if options.pool == "solo" else (options.concurrency, options.concurrency))
        self.pool = POOLS[options.pool](size, self.hostname, on_done=lambda j, o: None,
                                        max_tasks_per_child=options.max_tasks_per_child,
                                        max_memory_per_child=options.max_memory_per_child,
                                        min_size=least)
        # Reserve for the largest the pool may grow to: a waiting message is what makes it grow.
        self.consumer = Consumer(options.queues, self.pool, self.hostname,
                                 prefetch=max(1, size * max(1, options.prefetch_multiplier)),
                                 time_limit=options.time_limit,
                                 soft_time_limit=options.soft_time_limit)
        self.consumer.on_ready = self._ready
        # Always there, so that a monitor's enable_events can switch it on later.
        events = self.consumer.events = Events(
            self.hostname, enabled=options.events,
            counts=lambda: (len(self.pool.active()), self.consumer.tally.processed))
        self.consumer.watchers.append(events)
        self.control = Control(self.consumer, options.pool, self.consumer.prefetch)
        self.consumer.watchers.append(self.control)
        self.consumer.watchers.append(Heartbeat(self.consumer, options.pool))
        #: Calls on the event loop, for worker extensions (worker/timer.py).
        self.timer = Timer()
        self.consumer.on_connect.append(self.timer.attach)
        self.extensions = Extensions(
            self, extension_classes() if options.extensions is None else options.extensions,
            options.extension_options)
        if self.extensions:  # none: no watcher, nothing added per task
            self.consumer.watchers.append(self.extensions)
        self._signals = 0
        self._beat_pid: int | None = None

    def active_tasks(self) -> list[ActiveTask]:
        """The tasks running in the pool now, the longest running first (the ``solo`` pool,
        which runs a task inside the event loop, reports none)."""
        wall, now = time.time(), time.monotonic()
        return sorted((ActiveTask(id=job.msg.id, name=job.msg.name, queue=job.msg.queue,
                                  started_at=datetime.fromtimestamp(wall - (now - job.started),
                                                                    UTC),
                                  runtime=now - job.started)
                       for job in self.pool.active() if job.started),
                      key=lambda task: task.started_at)

    def _ready(self) -> None:
        pool = self.pool
        size = (f"autoscale={pool.min_size}..{pool.size}" if pool.autoscale
                else f"concurrency={pool.size}")
        logger.info("%s ready: pool=%s %s queues=%s broker=%s tasks=%d",
                    self.hostname, self.options.pool, size, ",".join(self.options.queues),
                    broker.safe_url(), len(registry.names()))
        signals.worker_ready.send(sender=self)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if signum == signal.SIGQUIT or self._signals > 1:
            logger.warning("Cold shutdown: running tasks are given back to the broker")
            self.consumer.stopping = self.consumer.cold = True
        else:
            grace = conf.get().SHUTDOWN_GRACE
            logger.warning("Warm shutdown (%s): finishing %d running task(s)%s; "
                           "signal again for a cold shutdown", signal.Signals(signum).name,
                           len(self.pool.active()),
                           f" for up to {grace:g}s" if grace is not None else "")
            if grace is not None:
                self.consumer.stop_deadline = time.monotonic() + grace
            self.consumer.stopping = True

    def run(self) -> int:
        """Run until shut down; returns the exit status."""
        if self.options.beat:
            self._beat_pid = _fork_beat(self.hostname)  # before any signal handling of ours
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self._on_signal)
        self.consumer.read_revoked()
        self.pool.start()
        try:
            self.extensions.start()
            self.consumer.run(wake_r, lambda: _drain(wake_r))
        finally:
            if self.consumer.cold:
                self.pool.kill()
            else:
                self.pool.stop()
            self.timer.detach()  # the event loop is gone
            # After the pool: on a cold shutdown no child still runs a task given back.
            self.extensions.stop()
            if self._beat_pid is not None:
                _stop_beat(self._beat_pid)
            for watcher in self.consumer.watchers:
                try:
                    watcher.close()
                except Exception:  # noqa: BLE001 - one watcher's failure must not stop the rest
                    logger.exception("Could not close %s", type(watcher).__name__)
            signal.set_wakeup_fd(previous)
            os.close(wake_r)
            os.close(wake_w)
            signals.worker_shutdown.send(sender=self)
            logger.info("%s stopped", self.hostname)
        return 0


def _fork_beat(hostname: str) -> int:
    """Start taskbeat in a child process (``-B``); its pid."""
    pid = os.fork()
    if pid:
        logger.info("Started taskbeat beside the worker (pid %d)", pid)
        return pid
    status = 1
    try:
        drop_inherited_db_connections()
        Beat(f"beat@{hostname}").run()
        status = 0
    except BaseException:  # noqa: BLE001 - a forked child must never return into the worker
        logger.exception("taskbeat beside the worker failed")
    finally:
        os._exit(status)


def _stop_beat(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def parse_autoscale(option: str) -> tuple[int, int]:
    """``--autoscale MAX,MIN`` as ``(MAX, MIN)``; ValueError saying what is wrong."""
    parts = [part.strip() for part in option.split(",")]
    try:
        high, low = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--autoscale takes MAX,MIN: two whole numbers separated by a comma, "
                         f"the most and the fewest pool children (e.g. --autoscale 10,3); "
                         f"got {option!r}") from None
    return high, low


def check_autoscale(autoscale: tuple[int, int], pool: str) -> None:
    """ValueError unless ``(MAX, MIN)`` is a range the ``pool`` can scale within."""
    high, low = autoscale
    given = f"--autoscale {high},{low}"
    if pool != "prefork":
        what = "one task at a time" if pool == "solo" else "a fixed number of threads (-c)"
        raise ValueError(f"{given} works with the prefork pool only; -P {pool} runs {what}. "
                         f"Use -P prefork, or drop --autoscale")
    if low < 0:
        raise ValueError(f"{given}: MIN must be 0 or more")
    if high < 1:
        raise ValueError(f"{given}: MAX must be at least 1")
    if high < low:
        raise ValueError(f"{given}: MAX ({high}) is below MIN ({low}); the order is MAX,MIN, "
                         f"e.g. --autoscale {low},{high}")


def queues_from(option: str | None) -> list[str]:
    """``-Q a,b`` as a list; the configured queues when not given."""
    if option:
        return [q.strip() for q in option.split(",") if q.strip()]
    cfg = conf.get()
    return list(cfg.QUEUES)
