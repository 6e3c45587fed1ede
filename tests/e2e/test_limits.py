"""End-to-end: limits on a real prefork worker: time limits and deliveries (any broker will do)."""

from __future__ import annotations

import pytest

from .conftest import Project

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
    assert project.count() == 0  # acknowledged, not delivered again


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
    assert project.count() == 0
