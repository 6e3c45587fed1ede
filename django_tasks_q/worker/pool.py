"""Processes: execution pools (prefork, threads, solo); each takes a job only when it has room."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import queue as queue_mod
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

from django.db import connections

from .. import conf, execute
from ..message import TaskMessage
from . import child
from .frames import Frames

logger = logging.getLogger("django_tasks_q.worker")

LOST = "LOST"  # the process running the job died
GROW_PAUSE = 5.0  # seconds an autoscaling pool stays at its size after a fork failed
#: A prefork child running a task may be handed the next one to start the moment it is done,
#: when tasks of both names have taken less than this many seconds on average (PreforkPool).
QUEUE_BEHIND_UNDER = 0.005
#: How many such tasks may wait in one child behind the one it runs.
QUEUE_BEHIND_MOST = 3
RUNTIME_WEIGHT = 0.2  # of the newest runtime in a task name's running average


@dataclass(eq=False)
class Job:
    """One received message on its way through the pool."""

    msg: TaskMessage  # as received: what a retry or a redelivery republishes
    message: Any  # the kombu message; stays in the parent
    run: TaskMessage | None = None  # what the pool runs: msg with the worker's limits filled in
    started: float = 0.0
    stale: bool = False  # its broker connection is gone: the broker redelivers it
    settled: bool = False  # acknowledged or rejected already
    timed_out: float = 0.0  # the hard time limit it was killed for running past
    revoked: bool = False  # revoked with terminate=True while it ran
    limit_timer: Any = None
    pid: int | None = field(default=None)


OnDone = Callable[[Job, execute.Outcome], None]


class Pool:
    """What every pool offers the consumer."""

    def __init__(self, size: int, hostname: str, on_done: OnDone,
                 max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None,
                 min_size: int | None = None) -> None:
        self.size = size  # with autoscale: the most children
        self.min_size = size if min_size is None else min_size  # the fewest (autoscale)
        self.hostname = hostname
        self.on_done = on_done
        self.on_slot: Callable[[], None] = lambda: None  # a slot became free without an outcome
        #: A submitted job that never started (its prefork child went away first).
        self.on_return: Callable[[Job], None] = lambda job: None
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
        self.hub: Any = None

    def start(self) -> None:
        """Start the workers."""

    def register(self, hub: Any) -> None:
        """Attach to the consumer's event loop (a new one after every reconnect)."""
        self.hub = hub

    @property
    def autoscale(self) -> bool:
        """True when the pool grows and shrinks between ``min_size`` and ``size``."""
        return self.min_size != self.size

    def free(self) -> int:
        """How many more jobs can start now."""
        raise NotImplementedError

    def takes(self, job: Job) -> bool:
        """Whether ``job`` can be submitted now."""
        return self.free() > 0

    def submit(self, job: Job) -> None:
        """Start ``job``; the outcome comes back through ``on_done``."""
        raise NotImplementedError

    def active(self) -> list[Job]:
        """Jobs submitted and not finished."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The processes tasks run in."""
        return [os.getpid()]

    def terminate(self, job: Job) -> None:
        """Stop a running job at once, where the pool can (prefork)."""
        logger.warning("Task %s[%s] was revoked with terminate=True, but the %s pool cannot "
                       "stop a running task; it runs to the end", job.msg.name, job.msg.id,
                       type(self).__name__)

    def stop(self) -> None:
        """Let idle workers exit (running jobs are finished first by the caller)."""

    def kill(self) -> None:
        """Stop at once; running jobs are abandoned."""
        self.stop()


class SoloPool(Pool):
    """Runs each job inline in the worker process."""

    def free(self) -> int:
        return 1

    def submit(self, job: Job) -> None:
        job.started = time.monotonic()
        self.on_done(job, child.run_one(job.run or job.msg, self.hostname))

    def active(self) -> list[Job]:
        return []


class ThreadPool(Pool):
    """Runs jobs on threads of the worker process (I/O-bound work)."""

    def start(self) -> None:
        self._jobs: queue_mod.SimpleQueue[Job | None] = queue_mod.SimpleQueue()
        self._running: set[Job] = set()
        self._threads = [threading.Thread(target=self._work, name=f"task-{i}", daemon=True)
                         for i in range(self.size)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            outcome = child.run_one(job.run or job.msg, self.hostname)
            self.hub.call_soon(self._finish, job, outcome)
        connections.close_all()

    def _finish(self, job: Job, outcome: execute.Outcome) -> None:
        self._running.discard(job)
        self.on_done(job, outcome)

    def free(self) -> int:
        return self.size - len(self._running)

    def submit(self, job: Job) -> None:
        job.started = time.monotonic()
        self._running.add(job)
        self._jobs.put(job)

    def active(self) -> list[Job]:
        return list(self._running)

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


@dataclass(eq=False)
class _Child:
    pid: int
    pipe: Connection
    frames: Frames  # what comes through the pipe
    jobs: deque[Job] = field(default_factory=deque)  # the one running, then those behind it
    done: int = 0
    retiring: bool = False  # reached max_tasks_per_child: exits after its last job
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def job(self) -> Job | None:
        """The job it runs."""
        return self.jobs[0] if self.jobs else None

    @property
    def idle(self) -> bool:
        """Free for a job: running none, and not on its way out."""
        return not self.jobs and not self.retiring


def _children(n: int) -> str:
    return f"{n} child" if n == 1 else f"{n} children"


class PreforkPool(Pool):
    """Forked children reused across jobs; a job goes to an idle child (fair dispatch).

    Short tasks are the exception: when none is idle, a child running a task whose name takes
    under ``QUEUE_BEHIND_UNDER`` on average is handed more such tasks (up to
    ``QUEUE_BEHIND_MOST``, to the child with the fewest first), which wait in its pipe and each
    start the moment the one before ends, without a round trip through this process.

    With autoscale (``min_size`` below ``size``) it starts ``min_size`` children, forks one more
    when a job is submitted while none is idle, and lets a child go once it has been idle for
    ``AUTOSCALE_KEEPALIVE`` seconds, never going below ``min_size``."""

    def start(self) -> None:
        self._children: dict[int, _Child] = {}
        self._stopping = False
        self._retired: set[int] = set()  # let go by autoscale, not reaped yet
        self._idle_timer: Any = None
        self._grow_after = 0.0  # monotonic time growing may be tried again
        self.keepalive = conf.get().AUTOSCALE_KEEPALIVE
        self._runtimes: dict[str, float] = {}  # running average per task name, in seconds
        # What the worker has loaded so far is shared with the children, and stays shared if
        # their garbage collector never writes to it: it leaves frozen objects alone.
        gc.freeze()
        for _ in range(self.min_size):
            self._spawn()

    def _spawn(self) -> _Child:
        # Children must not share the parent's database sockets.
        connections.close_all()
        parent_end, child_end = Pipe(duplex=True)
        try:
            pid = os.fork()
        except OSError:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                parent_end.close()
                for sibling in self._children.values():
                    sibling.pipe.close()
                code = child.main(child_end, self.hostname, self.max_tasks_per_child,
                                  self.max_memory_per_child)
            except BaseException:
                logger.exception("Pool child crashed")
            finally:
                os._exit(code)
        child_end.close()
        kid = _Child(pid, parent_end, Frames(parent_end.fileno()))
        self._children[pid] = kid
        if self.hub is not None:
            self.hub.add_reader(parent_end.fileno(), self._on_readable, kid)
        return kid

    def register(self, hub: Any) -> None:
        super().register(hub)
        for kid in self._children.values():
            hub.add_reader(kid.pipe.fileno(), self._on_readable, kid)
        if self.autoscale:
            # Called again with a new hub after every reconnect: one idle check, on the hub
            # in use.
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            every = min(1.0, max(0.1, self.keepalive / 4))
            self._idle_timer = hub.call_repeatedly(every, self._retire_idle)

    def _on_readable(self, kid: _Child) -> None:
        try:
            alive = kid.frames.read()
        except OSError:
            alive = False
        while (data := kid.frames.take()) is not None:
            self._finished(kid, pickle.loads(data))
        if not alive:
            self._on_exit(kid)

    def _finished(self, kid: _Child, outcome: execute.Outcome) -> None:
        now = kid.idle_since = time.monotonic()
        job = kid.jobs.popleft() if kid.jobs else None
        kid.done += 1
        kid.retiring = outcome.retire or (self.max_tasks_per_child is not None
                                          and kid.done >= self.max_tasks_per_child)
        if job is not None:
            if job.limit_timer is not None:
                job.limit_timer.cancel()
            name = job.msg.name
            last = self._runtimes.get(name)
            took = now - job.started
            self._runtimes[name] = took if last is None else last + RUNTIME_WEIGHT * (took - last)
        if kid.jobs and not kid.retiring:
            self._started(kid, kid.jobs[0])  # it was queued behind: it runs from now on
        if job is not None:
            self.on_done(job, outcome)

    def _started(self, kid: _Child, job: Job) -> None:
        job.started = time.monotonic()
        if job.revoked:  # revoked with terminate=True while it waited
            self.terminate(job)
            return
        limit = (job.run or job.msg).time_limit
        if limit:
            job.limit_timer = self.hub.call_later(limit, self._enforce_limit, kid, job, limit)

    def _on_exit(self, kid: _Child) -> None:
        with contextlib.suppress(Exception):
            self.hub.remove(kid.pipe.fileno())
        kid.pipe.close()
        self._children.pop(kid.pid, None)
        _, status = os.waitpid(kid.pid, 0)
        how = (f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
               if os.WIFSIGNALED(status) else f"exit code {os.waitstatus_to_exitcode(status)}")
        if not self._stopping:
            self._spawn()  # first, so that the outcome below can hand the new child work
        # A retiring child exits after its last outcome: what it still holds never started.
        running = None if kid.retiring or not kid.jobs else kid.jobs.popleft()
        for job in reversed(kid.jobs):
            self.on_return(job)
        if running is not None:
            logger.error("Pool child %d died (%s) while running %s[%s]", kid.pid, how,
                         running.msg.name, running.msg.id)
            self.on_done(running, execute.Outcome(LOST, error=f"pool child died ({how})"))
        else:
            self.on_slot()

    def free(self) -> int:
        idle = sum(1 for kid in self._children.values() if kid.idle)
        if self.autoscale and not self._stopping and time.monotonic() >= self._grow_after:
            return idle + self.size - len(self._children)  # with the children it may still fork
        return idle

    def _grow(self) -> _Child | None:
        """Fork one more child (autoscale); None when the system refuses."""
        if not self.autoscale or len(self._children) >= self.size:
            raise RuntimeError("submit() without a free slot")
        try:
            kid = self._spawn()
        except OSError as exc:  # out of processes or memory: carry on with those there are
            self._grow_after = time.monotonic() + GROW_PAUSE
            logger.warning("Pool could not grow beyond %s (%s); trying again in %gs",
                           _children(len(self._children)), exc, GROW_PAUSE)
            return None
        logger.info("Pool grew to %s (autoscale %d..%d)", _children(len(self._children)),
                    self.min_size, self.size)
        return kid

    def _retire_idle(self) -> None:
        """Let go of children idle for the keep-alive, down to ``min_size``; never a busy one."""
        self._reap_retired()
        if self._stopping:
            return
        now = time.monotonic()
        idle = sorted((kid for kid in self._children.values()
                       if kid.idle and now - kid.idle_since >= self.keepalive),
                      key=lambda kid: kid.idle_since)
        for kid in idle[:max(0, len(self._children) - self.min_size)]:
            with contextlib.suppress(Exception):
                self.hub.remove(kid.pipe.fileno())
            kid.pipe.close()  # the child's loop ends at end of file and it exits
            del self._children[kid.pid]
            self._retired.add(kid.pid)
            logger.info("Pool shrank to %s (autoscale %d..%d): pool child %d was idle for %.1fs",
                        _children(len(self._children)), self.min_size, self.size, kid.pid,
                        now - kid.idle_since)

    def _reap_retired(self, block: bool = False) -> None:
        for pid in list(self._retired):
            try:
                done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._retired.discard(pid)

    def takes(self, job: Job) -> bool:
        return self.free() > 0 or self._behind(job) is not None

    def _short(self, name: str) -> bool:
        return self._runtimes.get(name, QUEUE_BEHIND_UNDER) < QUEUE_BEHIND_UNDER

    def _behind(self, job: Job) -> _Child | None:
        """The busy child with the fewest jobs that ``job`` (a short task) may wait in, behind
        short tasks only."""
        if not self._short(job.msg.name):
            return None
        cap = self.max_tasks_per_child
        best: _Child | None = None
        for kid in self._children.values():
            n = len(kid.jobs)
            if (0 < n <= QUEUE_BEHIND_MOST and not kid.retiring
                    and (best is None or n < len(best.jobs))
                    and (cap is None or kid.done + n + 1 <= cap)
                    and all(self._short(j.msg.name) for j in kid.jobs)):
                best = kid
        return best

    def submit(self, job: Job) -> None:
        kid = next((k for k in self._children.values() if k.idle), None)
        if kid is None and self.free():  # every child is busy: autoscale forks one for this job
            kid = self._grow()
        kid = kid or self._behind(job)
        if kid is None:
            self.on_done(job, execute.Outcome(execute.REQUEUE,
                                              error="the pool could not fork a child to run it"))
            return
        job.started, job.pid = time.monotonic(), kid.pid
        kid.jobs.append(job)
        if len(kid.jobs) == 1:
            self._started(kid, job)
        # If the child is gone, its pipe's EOF reports the job as lost.
        with contextlib.suppress(OSError):
            kid.pipe.send_bytes(pickle.dumps(job.run or job.msg))

    def _enforce_limit(self, kid: _Child, job: Job, limit: float) -> None:
        if kid.job is not job:
            return
        logger.error("Task %s[%s] ran past its hard time limit (%gs): killing pool child %d",
                     job.msg.name, job.msg.id, limit, kid.pid)
        job.timed_out = limit
        with contextlib.suppress(ProcessLookupError):
            os.kill(kid.pid, signal.SIGKILL)

    def terminate(self, job: Job) -> None:
        # One queued behind another is killed once it runs (_started).
        for kid in self._children.values():
            if kid.job is job:
                logger.warning("Task %s[%s] was revoked with terminate=True: killing pool "
                               "child %d", job.msg.name, job.msg.id, kid.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid.pid, signal.SIGKILL)

    def pids(self) -> list[int]:
        return list(self._children)

    def active(self) -> list[Job]:
        return [job for kid in self._children.values() for job in kid.jobs]

    def stop(self) -> None:
        self._stopping = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for kid in list(self._children.values()):
            kid.pipe.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(kid.pid, 0)
        self._children.clear()
        self._reap_retired(block=True)

    def kill(self) -> None:
        self._stopping = True
        for pid in [*self._children, *self._retired]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stop()


POOLS: dict[str, type[Pool]] = {"prefork": PreforkPool, "threads": ThreadPool, "solo": SoloPool}
