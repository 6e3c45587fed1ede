"""End-to-end: the prefork pool's children come and go: --max-tasks-per-child and --autoscale."""

from __future__ import annotations

from collections import Counter

import psutil
import pytest

from .conftest import Project, Worker, tasks_q_extra, wait_for

pytestmark = pytest.mark.e2e  # on every broker of ``project``; prefork never runs on memory://

TASKS = "testproject.testapp.tasks"
REPORT_PID = f"{TASKS}.report_pid"
KEEPALIVE = 1.0  # AUTOSCALE_KEEPALIVE for these workers, in seconds


def pool_children(worker: Worker) -> list[int]:
    """The pids of the worker's live pool children (exited ones not reaped yet left out)."""
    return sorted(kid.pid for kid in psutil.Process(worker.pid).children()
                  if kid.status() != psutil.STATUS_ZOMBIE)


def wait_children(worker: Worker, count: int, timeout: float) -> list[int]:
    """Wait until the worker has exactly ``count`` (at least 1) live pool children; their pids."""
    def counted() -> list[int]:
        kids = pool_children(worker)
        return kids if len(kids) == count else []

    return wait_for(counted, timeout, f"{count} pool children of {worker.hostname}",
                    lambda: worker.log)


def test_max_tasks_per_child_replaces_the_child_and_runs_every_task_once(
        project: Project) -> None:
    worker = project.worker("--max-tasks-per-child", "2", concurrency=1)
    [first_child] = pool_children(worker)
    ids = [project.send(REPORT_PID) for _ in range(5)]

    rows = project.wait_results(ids, timeout=30)

    assert all(row["status"] == "SUCCESS" and row["retries"] == 0 for row in rows.values())
    in_order = [row["result"] for row in sorted(rows.values(), key=lambda r: r["date_started"])]
    a, b, c = dict.fromkeys(in_order)  # three children, in the order they ran tasks
    assert in_order == [a, a, b, b, c]
    assert a == first_child
    assert worker.pid not in in_order
    for task_id in ids:  # each ran once: one success line per id, nothing given back
        # The child stores the row before the parent hears of it and logs the line.
        worker.wait_log(rf"report_pid\[{task_id}\] succeeded", timeout=5)
        assert worker.count(rf"report_pid\[{task_id}\] succeeded") == 1
    project.assert_empty()
    # The same worker parent throughout, with the third child still serving it.
    assert worker.proc.poll() is None
    assert pool_children(worker) == [c]
    assert worker.count(r"Pool child \d+ died") == 0


def test_autoscale_grows_under_load_and_shrinks_after_the_keepalive(project: Project) -> None:
    project.extra_env["TASKS_Q_EXTRA"] = tasks_q_extra(AUTOSCALE_KEEPALIVE=KEEPALIVE)
    worker = project.worker("--autoscale", "3,1")  # the helper passes -c 2 too: ignored
    assert worker.count(r"ready: pool=prefork autoscale=1\.\.3 ") == 1
    assert worker.count(r"-c/--concurrency 2 is ignored: --autoscale 3,1 sizes the pool") == 1
    [first_child] = pool_children(worker)

    ids = [project.send(REPORT_PID, 2) for _ in range(6)]
    grown = wait_children(worker, 3, timeout=10)

    rows = project.wait_results(ids, timeout=30)
    assert all(row["status"] == "SUCCESS" for row in rows.values())
    pids = Counter(row["result"] for row in rows.values())
    assert set(pids) == set(grown) and first_child in pids  # three children shared the work
    assert worker.count(r"Pool grew to 2 children \(autoscale 1\.\.3\)") == 1
    assert worker.count(r"Pool grew to 3 children \(autoscale 1\.\.3\)") == 1
    assert worker.count(r"Pool grew to") == 2  # never past MAX

    [left] = wait_children(worker, 1, timeout=KEEPALIVE + 10)
    assert left in grown
    worker.wait_log(r"Pool shrank to 1 child \(autoscale 1\.\.3\): pool child \d+ was idle",
                    timeout=5)
    assert worker.count(r"Pool shrank to 2 children \(autoscale 1\.\.3\)") == 1
    assert worker.count(r"Pool shrank to") == 2  # never below MIN

    # One task for one idle child: no reason to grow.
    one = project.send(REPORT_PID)
    assert project.wait_results([one], timeout=10)[one]["result"] == left
    assert worker.count(r"Pool grew to") == 2
    assert worker.count(r"Pool child \d+ died") == 0
