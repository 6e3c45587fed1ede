"""Foundation: signals sent around publishing, running and worker life.

Named and shaped as Celery's: a receiver written for Celery's signal of the same name, taking
``**kwargs``, works unchanged. docs/signals.rst says where and when each one is sent.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal


class TaskSignal(Signal):
    """A Django signal whose failing receivers are logged, not raised, as in Celery."""

    def send(self, sender: Any, **named: Any) -> list[tuple[Any, Any]]:
        """Call every receiver; one that raises is logged (logger ``django.dispatch``) and the
        others still run, so a broken receiver cannot fail a task, a publish or a worker."""
        if not self.receivers:  # the common case, on every publish and every task run
            return []
        return self.send_robust(sender, **named)


def _signal(doc: str) -> TaskSignal:
    made = TaskSignal()
    made.__doc__ = doc
    return made


before_task_publish = _signal(
    """Just before a task message is published, in the process that publishes it.

    ``sender``: the task name. ``body``: ``(args, kwargs, embed)``. ``exchange``: ``""`` (the
    default exchange, which routes by queue name). ``routing_key``: the queue. ``headers``: the
    protocol v2 headers, a dict that is published as the receiver leaves it. ``properties``:
    the message properties. ``declare``: ``[]``. ``retry_policy``: how publishing is retried.
    """)

after_task_publish = _signal(
    """Once a task message is published, in the process that published it.

    ``sender``: the task name. ``body``, ``exchange``, ``routing_key``, ``headers``: as for
    ``before_task_publish``.
    """)

task_prerun = _signal(
    """Before a task runs, in the process (or thread) that runs it.

    ``sender``: the task. ``task_id``, ``task``, ``args``, ``kwargs``.
    """)

task_postrun = _signal(
    """After a task ran, whatever the outcome, in the process (or thread) that ran it.

    ``sender``: the task. ``task_id``, ``task``, ``args``, ``kwargs``; ``retval``: the return
    value, or the exception of a failure or retry; ``state``: ``"SUCCESS"``, ``"FAILURE"``,
    ``"RETRY"``, ``"REJECTED"``, or None when the outcome could not be stored.
    """)

task_success = _signal(
    """After a task returned, in the process (or thread) that ran it.

    ``sender``: the task. ``result``: the return value.
    """)

task_failure = _signal(
    """After a task failed for good (no retry left), in the process that ran it; in the
    worker's main process for a task killed at its hard time limit or whose process died.

    ``sender``: the task (None when not registered there). ``task_id``, ``exception``,
    ``args``, ``kwargs``; ``traceback`` and ``einfo``: the formatted traceback (a string, empty
    when the task's process was killed).
    """)

task_retry = _signal(
    """When a task is to be retried, in the process that ran it.

    ``sender``: the task. ``request``: the ``Request`` of the run (``self.request``);
    ``reason``: the exception that caused the retry; ``einfo``: the formatted traceback.
    """)

task_revoked = _signal(
    """When a worker does not run a task, or stops it: expired, revoked, or terminated.

    ``sender``: the task (None when not registered there). ``request``: the ``Request`` it would
    have run with; ``terminated``: True when a running task was killed; ``signum``: the signal
    that killed it, else None; ``expired``: True when its ``expires`` time had passed.
    """)

worker_ready = _signal(
    """Once a worker consumes from its queues, in the worker's main process.

    ``sender``: the ``Worker``.
    """)

worker_shutdown = _signal(
    """When a worker has stopped its pool, just before it exits, in its main process.

    ``sender``: the ``Worker``.
    """)

worker_process_init = _signal(
    """In each prefork pool child, once it started and before it runs a task.

    ``sender``: None.
    """)

beat_init = _signal(
    """When a ``taskbeat`` starts, before its first tick, in its process.

    ``sender``: the ``Beat``.
    """)
