"""End-to-end: a worker that finds a backlog runs the higher priorities first, on every broker."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from .conftest import Project

pytestmark = pytest.mark.e2e

ADD = "testproject.testapp.tasks.add"


@pytest.mark.parametrize("project", [pytest.param("redis", marks=pytest.mark.broker),
                                     pytest.param("amqp", marks=pytest.mark.broker),
                                     "django-sqlite"], indirect=True)
def test_high_priority_tasks_sent_last_run_first(project: Project) -> None:
    def send(priority: int | None, n: int) -> list[str]:
        return [project.producer.call("send_task", name=ADD, args=[priority or 0, i], kwargs={},
                                      queue=project.queue, priority=priority)
                for i in range(n)]

    if project.broker == "amqp":  # RabbitMQ honours priorities in queues declared with them
        project.extra_env["TASKS_Q_BROKER_OPTIONS"] = json.dumps({"max_priority": 9})
    # Sent while no worker runs, lowest first: first in, first out would run them in this order.
    # Each level is a band of its own on Redis too (kombu's default steps).
    low = send(None, 3) + send(0, 3)
    middle = send(5, 3)
    high = send(9, 3)
    assert project.count() == 12

    project.worker("--prefetch-multiplier", "1", concurrency=1, pool="prefork")
    rows = project.wait_results(low + middle + high, timeout=30)

    assert {row["status"] for row in rows.values()} == {"SUCCESS"}
    ran = sorted(rows, key=lambda task_id: datetime.fromisoformat(rows[task_id]["date_started"]))
    assert ran == high + middle + low
