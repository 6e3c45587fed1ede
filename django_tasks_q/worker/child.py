"""Processes: a prefork pool child: receives one job at a time, runs it, reports the outcome."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from django.db import DatabaseError, close_old_connections, connections

from .. import broker, execute, signals, workflow
from ..exceptions import EnqueueError
from ..message import TaskMessage
from .frames import Frames

logger = logging.getLogger("django_tasks_q.worker")

PR_SET_PDEATHSIG = 1
#: A child checks its database connections after every job, and before one only when it has
#: waited longer than this since (Django's check, made for each request, costs a good part of
#: running a short task).
RECHECK_AFTER = 1.0


def _die_with_parent() -> None:
    # If the parent is SIGKILLed, its children must not keep its broker sockets open:
    # the broker only gives the parent's unacked messages back once every copy is closed.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def drop_inherited_db_connections() -> None:
    """Forget database connections opened before fork without closing the parent's sockets."""
    for conn in connections.all(initialized_only=True):
        raw: Any = conn.connection
        if raw is None:
            continue
        fileno = getattr(raw, "fileno", None)
        if callable(fileno) and conn.vendor == "postgresql":
            # Closing the socket fd here (not the connection) sends nothing to the server,
            # so the parent's session stays intact.
            with contextlib.suppress(Exception):
                os.close(fileno())
        with contextlib.suppress(Exception):
            conn.close()
        conn.connection = None


def resident_kib() -> int:
    """This process's resident memory now, in KiB (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main(pipe: Connection, hostname: str, max_tasks: int | None,
         max_memory: int | None = None) -> int:
    """Child loop: until the parent closes the pipe, ``max_tasks`` jobs are done, or the
    child's memory passes ``max_memory`` KiB after a job."""
    _die_with_parent()
    multiprocessing.current_process().name = f"PoolWorker-{os.getpid()}"  # for log lines
    # The parent decides when to stop; a terminal's Ctrl-C must not kill a running task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    drop_inherited_db_connections()
    signals.worker_process_init.send(sender=None)
    done = 0
    frames = Frames(pipe.fileno())
    checked = float("-inf")  # when the connections were last checked
    while max_tasks is None or done < max_tasks:
        try:
            data = frames.next()
        except OSError:
            data = None
        if data is None:  # the parent closed the pipe, or is gone
            break
        msg: TaskMessage = pickle.loads(data)
        outcome = run_one(msg, hostname, check_first=time.monotonic() - checked > RECHECK_AFTER)
        checked = time.monotonic()
        done += 1
        if max_memory is not None and (used := resident_kib()) > max_memory:
            logger.warning("Pool child %d uses %d KiB, over --max-memory-per-child %d KiB: "
                           "it is replaced", os.getpid(), used, max_memory)
            outcome.retire = True
        pipe.send_bytes(pickle.dumps(outcome))
        if outcome.retire:
            break
    return 0


def run_one(msg: TaskMessage, hostname: str, check_first: bool = True) -> execute.Outcome:
    """Run one job with fresh database connections (checked before it, unless ``check_first``
    is false, and after it); never raise."""
    if check_first:
        close_old_connections()
    try:
        # A workflow reads its members' rows as they end; other successes are stored by the
        # worker, many in one statement (worker/consumer.py).
        in_workflow = workflow.in_workflow(msg)
        outcome = execute.run(msg, hostname, store_later=not in_workflow)
        if in_workflow:
            # Worked out here, where the return value is; the parent publishes them.
            outcome.follow = workflow.follow_ups(msg, outcome)
        # What the task sent is confirmed before its own message is acknowledged.
        broker.flush()
    except Exception as exc:  # noqa: BLE001 - not stored, or what it sent not confirmed
        if isinstance(exc, EnqueueError):  # what it sent may be lost: run it again
            logger.error("Task %s[%s]: %s; giving it back", msg.name, msg.id, exc)
        elif isinstance(exc, DatabaseError):  # the database went away: no traceback needed
            logger.error("Task %s[%s]: outcome could not be stored (%s: %s); giving it back",
                         msg.name, msg.id, type(exc).__name__, str(exc).strip())
        else:  # a bug in storing: keep the traceback
            logger.exception("Task %s[%s]: outcome could not be stored; giving it back",
                             msg.name, msg.id)
        outcome = execute.Outcome(execute.REQUEUE, error=f"{type(exc).__name__}: {exc}")
    finally:
        close_old_connections()
    # Return values and exceptions stay here: only the plain outcome (their reprs, a failure's
    # traceback, and a success's JSON-ready value when the worker is to store it) crosses the
    # pipe.
    outcome.value = outcome.exc = None
    return outcome
