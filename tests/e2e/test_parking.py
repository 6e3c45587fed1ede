"""End-to-end: tasks due later are parked in the database, not held by the worker."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import psutil
import pytest

from .conftest import Project, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ADD = "testproject.testapp.tasks.add"
PARKED = 100_000


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.mark.parametrize("project", ["redis", "amqp", "django-sqlite"], indirect=True)
def test_parked_tasks_do_not_grow_the_workers_memory(project: Project) -> None:
    worker = project.worker(concurrency=1)
    project.wait_results([project.send(ADD, 0, 0)], timeout=10)  # warmed up
    time.sleep(1)
    before = rss_mib(worker.proc.pid)

    project.producer.call("send_many", timeout=300, name=ADD, count=PARKED, countdown=3600,
                          queue=project.queue)
    parked = 0

    def all_parked() -> bool:
        nonlocal parked
        parked = project.producer.call("parked_count")
        return parked == PARKED

    try:
        wait_for(all_parked, 300, f"{PARKED} messages to be parked", interval=1)
    except AssertionError:
        raise AssertionError(f"{parked} parked, {project.count()} still with the broker, "
                             f"{PARKED} sent\n{project.logs()}") from None

    after = rss_mib(worker.proc.pid)
    assert after - before < 40, f"worker grew from {before:.0f} to {after:.0f} MiB"
    project.assert_empty()


@pytest.mark.parametrize("project", ["redis", "amqp", "django-sqlite"], indirect=True)
def test_a_parked_task_runs_once_when_due_even_across_a_restart(project: Project) -> None:
    worker = project.worker(concurrency=1)
    task_id = project.producer.call("send_due", name=ADD, args=[20, 22], seconds=40,
                                    queue=project.queue)
    wait_for(lambda: project.producer.call("parked_count") == 1, 10, "the task to be parked",
             project.logs)
    project.assert_empty()
    worker.stop()  # a restart while it waits

    project.producer.call("make_due")
    project.worker(concurrency=1)
    row = project.wait_results([task_id], timeout=15)[task_id]
    assert row["result"] == 42 and row["status"] == "SUCCESS"
    assert project.producer.call("parked_count") == 0
    time.sleep(1.5)
    assert len(project.results([task_id])) == 1
    assert datetime.fromisoformat(row["date_done"]) - datetime.fromisoformat(
        row["date_created"]) < timedelta(seconds=5)
