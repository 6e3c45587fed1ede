"""End-to-end on Redis: leases on held messages, with a visibility timeout of two seconds."""

from __future__ import annotations

import json
import signal

import pytest

from .conftest import Project, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker,
              pytest.mark.parametrize("project", ["redis"], indirect=True)]

TASKS = "testproject.testapp.tasks"
# Leases short enough for a dead worker's messages to come back within seconds (Redis and
# django://; RabbitMQ gives them back as soon as the dead worker's connection is gone). kombu's
# restore takes a Redis lock that lives 5 minutes unless released: a worker killed while it
# holds it would keep the others from restoring for the rest of the test.
SHORT_LEASES = {"visibility_timeout": 2, "unacked_restore_interval": 0.5,
                "unacked_restore_throttle": 1, "unacked_mutex_expire": 5}


def test_a_task_longer_than_the_visibility_timeout_runs_once(project: Project) -> None:
    project.extra_env["TASKS_Q_BROKER_OPTIONS"] = json.dumps(SHORT_LEASES)
    first, second = project.worker(concurrency=1), project.worker(concurrency=1)
    slow = project.create_order("slow-6@example.com")
    slow_id = project.send(f"{TASKS}.send_receipt", slow)

    workers = [first, second]
    started = r"e2e-mail: sending to slow-6@"
    runner = wait_for(lambda: next((w for w in workers if w.count(started)), None), 10,
                      "the slow task to start", project.logs)
    runner.wait_log(rf"send_receipt\[{slow_id}\] succeeded", timeout=15)

    starts = sum(w.count(started) for w in workers)
    assert starts == 1, "the held message was given to the other worker:\n" + project.logs()
    project.assert_empty()


def test_a_dead_workers_task_comes_back_within_seconds(project: Project) -> None:
    project.extra_env["TASKS_Q_BROKER_OPTIONS"] = json.dumps(SHORT_LEASES)
    doomed = project.worker(concurrency=1)
    slow = project.create_order("slow-2@example.com")
    slow_id = project.send(f"{TASKS}.send_receipt", slow)
    doomed.wait_log(r"e2e-mail: sending to slow-2@")
    doomed.signal(signal.SIGKILL)  # the whole worker, children die with it
    doomed.wait_exit(5)

    rescuer = project.worker(concurrency=1)
    rescuer.wait_log(r"e2e-mail: sending to slow-2@", timeout=10)
    rescuer.wait_log(rf"send_receipt\[{slow_id}\] succeeded", timeout=10)
    assert project.order(slow)["receipt_sent_at"] is not None
    project.assert_empty()
