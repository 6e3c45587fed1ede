"""End-to-end: a real ``taskworker`` reports by heartbeat what the dashboard shows: its row
appears at start, its counts rise as tasks run, and a warm shutdown marks it stopped."""

from __future__ import annotations

import json
import signal
import sqlite3
from typing import Any
from urllib.parse import urlparse

import pytest

from django_tasks_q.monitor import HEARTBEAT_INTERVAL

from .conftest import Project, wait_for

pytestmark = pytest.mark.e2e

TASKS = "testproject.testapp.tasks"
ADD = f"{TASKS}.add"
STOP = 15  # seconds a worker may take to exit after SIGTERM


def _query(project: Project, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows of ``sql`` from the project's SQLite database, read beside the worker."""
    conn = sqlite3.connect(urlparse(project.database_url).path, timeout=20)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def worker_state(project: Project, hostname: str) -> dict[str, Any] | None:
    """The ``WorkerState`` row of ``hostname``, or None."""
    rows = _query(project, "SELECT * FROM django_tasks_q_workerstate WHERE hostname = ?",
                  hostname)
    if not rows:
        return None
    row = rows[0]
    row["queues"] = json.loads(row["queues"])
    return row


def counted(project: Project, hostname: str) -> tuple[int, int]:
    """Processed and failed over ``hostname``'s per-minute rows."""
    [row] = _query(project, "SELECT COALESCE(SUM(processed), 0) AS p, "
                            "COALESCE(SUM(failed), 0) AS f FROM django_tasks_q_taskcount "
                            "WHERE worker = ?", hostname)
    return int(row["p"]), int(row["f"])


@pytest.mark.parametrize("project", ["django-sqlite", "redis"], indirect=True)
def test_a_worker_reports_by_heartbeat_until_a_warm_shutdown(project: Project) -> None:
    worker = project.worker(concurrency=3)
    # Written as the consumer connects: there by the time the worker says it is ready.
    row = wait_for(lambda: worker_state(project, worker.hostname), 3, "the worker's row",
                   project.logs)
    assert (row["pid"], row["pool"], row["concurrency"], row["queues"], row["stopped_at"]) == (
        worker.pid, "prefork", 3, [project.queue], None)
    assert (row["processed"], row["failed"]) == (0, 0)
    first_beat = row["last_heartbeat"]

    declined = project.create_order("eve@declined.example")
    ids = [project.send(ADD, i, i) for i in range(5)]
    ids.append(project.send(f"{TASKS}.charge_payment", declined))
    project.wait_results(ids)

    def caught_up() -> dict[str, Any] | None:
        now = worker_state(project, worker.hostname)
        return now if now and now["processed"] == 6 else None

    row = wait_for(caught_up, 2 * HEARTBEAT_INTERVAL + 2, "the heartbeat with 6 processed",
                   project.logs, interval=0.2)
    assert (row["failed"], row["stopped_at"]) == (1, None)
    assert row["last_heartbeat"] > first_beat
    assert counted(project, worker.hostname) == (6, 1)

    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(STOP) == 0
    row = worker_state(project, worker.hostname)
    assert row is not None and row["stopped_at"] is not None
    assert (row["processed"], row["failed"], row["active"]) == (6, 1, 0)
