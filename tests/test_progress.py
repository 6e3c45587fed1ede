"""Progress: ``self.update_state()`` in a running task, read through ``AsyncResult`` meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connections
from kombu.connection import Connection

from django_tasks_q import AsyncResult, Task, broker, task
from django_tasks_q.models import TaskResult
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.pool import ThreadPool

from .running import run_consumer

pytestmark = pytest.mark.django_db(transaction=True)

#: Opened by the test, one per step of ``in_steps``.
steps = [threading.Event(), threading.Event()]


@task(bind=True, results="all")
def in_steps(self: Task[..., Any], total: int) -> str:
    """Reports each step done, then waits for the test to let it go on."""
    for done, step in enumerate(steps[:total], start=1):
        self.update_state(state="PROGRESS", meta={"done": done, "total": total})
        step.wait(20)
    return f"{total} steps"


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def worker_thread() -> threading.Thread:
    """A threads-pool worker on memory:// that stops after one task, in a thread of its own."""
    consumer = Consumer(["default"], ThreadPool(2, "w1", on_done=lambda j, o: None), "w1",
                        prefetch=4)

    def run() -> None:
        try:
            run_consumer(consumer, 1, timeout=30)
        finally:
            connections.close_all()

    return threading.Thread(target=run, name="worker")


def test_progress_is_read_while_the_task_runs() -> None:
    with Connection("memory://") as conn:
        broker.queue("default")(conn.default_channel).purge()
    for step in steps:
        step.clear()
    sent = in_steps.delay(2)
    assert AsyncResult(sent.id).state == "PENDING"
    worker = worker_thread()
    worker.start()
    try:
        seen = AsyncResult(sent.id)  # one handle, read again and again, as a progress bar does
        eventually(lambda: seen.state == "PROGRESS", "the first PROGRESS")
        assert seen.info == {"done": 1, "total": 2} and not seen.ready()
        row = TaskResult.objects.get(task_id=sent.id)
        assert (row.task_name, row.worker, row.date_done) == (in_steps.name, "w1", None)

        steps[0].set()
        eventually(lambda: seen.info == {"done": 2, "total": 2}, "the second step")
        assert seen.state == "PROGRESS" and seen.result == seen.info

        steps[1].set()
        assert sent.get(timeout=15) == "2 steps"
        assert (seen.state, seen.info, seen.ready()) == ("SUCCESS", "2 steps", True)
    finally:
        for step in steps:
            step.set()
        worker.join(30)
    assert not worker.is_alive()
