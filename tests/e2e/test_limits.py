"""End-to-end: limits on a real prefork worker: time limits and deliveries (any broker will do)."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import Project, tasks_q_extra

pytestmark = [pytest.mark.e2e, pytest.mark.broker,
              pytest.mark.parametrize("project", ["redis"], indirect=True)]

TASKS = "testproject.testapp.tasks"
ADD = f"{TASKS}.add"


def test_hard_time_limit_kills_the_child_and_the_worker_goes_on(project: Project) -> None:
    worker = project.worker("--time-limit", "1", concurrency=1)
    slow = project.create_order("slow-5@example.com")
    slow_id = project.send(f"{TASKS}.send_receipt", slow)
    after = project.send(ADD, 20, 22)

    rows = project.wait_results([slow_id, after], timeout=15)

    failed = rows[slow_id]
    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "TimeLimitExceeded"
    assert "hard time limit (1s) exceeded" in failed["result"]["exc_message"]
    assert rows[after]["result"] == 42  # run by the replacement child
    assert worker.count(r"ran past its hard time limit \(1s\): killing pool child") == 1
    assert project.order(slow)["receipt_sent_at"] is None
    project.assert_empty()  # acknowledged, not delivered again


def test_soft_time_limit_raises_inside_the_task(project: Project) -> None:
    project.worker("--soft-time-limit", "0.5", concurrency=1)
    slow = project.create_order("slow-3@example.com")
    slow_id = project.send(f"{TASKS}.send_receipt", slow)

    failed = project.wait_results([slow_id], timeout=10)[slow_id]

    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "SoftTimeLimitExceeded"
    assert "soft time limit (0.5s) exceeded" in failed["result"]["exc_message"]
    assert "in send_receipt" in failed["traceback"]


def test_a_task_that_kills_its_process_is_given_up_after_max_deliveries(
        project: Project) -> None:
    worker = project.worker(concurrency=1)
    crashing = project.create_order("crash@example.com")
    crash_id = project.send(f"{TASKS}.send_receipt", crashing)
    after = project.send(ADD, 1, 2)

    rows = project.wait_results([crash_id, after], timeout=20)

    failed = rows[crash_id]
    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "WorkerLostError"
    assert "died on each of its 3 deliveries (MAX_DELIVERIES = 3)" in (
        failed["result"]["exc_message"])
    assert worker.count(r"e2e-mail: crashing on crash@") == 3
    assert worker.count(r"Pool child \d+ died \(signal SIGKILL\)") == 3
    assert rows[after]["result"] == 3  # the worker carried on with new children
    project.assert_empty()


def test_warm_shutdown_gives_running_tasks_back_after_the_grace_period(
        project: Project) -> None:
    project.extra_env["TASKS_Q_EXTRA"] = tasks_q_extra(SHUTDOWN_GRACE=1)
    worker = project.worker(concurrency=1)
    slow = project.create_order("slow-8@example.com")
    project.send(f"{TASKS}.send_receipt", slow)
    worker.wait_log(r"e2e-mail: sending to slow-8@")

    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(10) == 0
    assert time.monotonic() - started < 6

    warm = r"Warm shutdown \(SIGTERM\): finishing 1 running task\(s\) for up to 1s"
    assert worker.count(warm) == 1
    assert worker.count(r"grace period is over: giving 1 running task\(s\) back") == 1
    assert worker.count(r"e2e-mail: sent to slow-8@") == 0
    assert project.count() == 1  # back in the queue, for the next worker


def test_revoke_with_terminate_stops_a_running_task(project: Project) -> None:
    worker = project.worker(concurrency=1)
    slow = project.create_order("slow-8@example.com")
    slow_id = project.send(f"{TASKS}.send_receipt", slow)
    worker.wait_log(r"e2e-mail: sending to slow-8@")

    project.producer.call("revoke", task_id=slow_id, terminate=True)
    worker.wait_log(rf"send_receipt\[{slow_id}\] was revoked with terminate=True: killing",
                    timeout=5)
    after = project.send(ADD, 2, 2)

    assert project.wait_results([after], timeout=10)[after]["result"] == 4
    [row] = project.results([slow_id])
    assert row["status"] == "REVOKED" and row["result"]["terminate"] is True
    assert worker.count(r"e2e-mail: sent to slow-8@") == 0
    project.assert_empty()  # acknowledged: not run again


def test_max_memory_per_child_replaces_the_child_after_its_task(project: Project) -> None:
    worker = project.worker("--max-memory-per-child", "1024", concurrency=1)  # 1 MiB: always
    ids = [project.send(ADD, i, i) for i in range(3)]

    rows = project.wait_results(ids, timeout=15)

    assert sorted(r["result"] for r in rows.values()) == [0, 2, 4]
    assert worker.count(r"over --max-memory-per-child 1024 KiB: it is replaced") == 3
