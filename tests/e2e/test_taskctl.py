"""End-to-end: ``manage.py taskctl`` against real worker processes on each broker: a health
check that fails when no worker answers, inspect, and revoke --terminate on the prefork pool."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import PYTHON, REPO, Project, wait_for

pytestmark = pytest.mark.e2e

REPORT_PID = "testproject.testapp.tasks.report_pid"


def taskctl(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py taskctl ARGS`` on the project's broker and database."""
    return subprocess.run([PYTHON, "manage.py", "taskctl", *args], cwd=REPO, env=project.env,
                          capture_output=True, text=True, timeout=60)


def test_ping_is_a_health_check(project: Project) -> None:
    worker = project.worker(concurrency=1)
    ok = taskctl(project, "ping", "-d", worker.hostname)
    assert ok.returncode == 0, ok.stderr
    assert f"-> {worker.hostname}: OK pong" in ok.stdout
    worker.stop()
    down = taskctl(project, "ping", "-d", worker.hostname, "--timeout", "0.5")
    assert down.returncode == 2, down.stdout + down.stderr
    assert f"No worker of {worker.hostname} answered within 0.5s" in down.stderr


def test_inspect_active_and_revoke_terminate_kill_the_running_task(project: Project) -> None:
    worker = project.worker(concurrency=2)
    task_id = project.send(REPORT_PID, 30)

    def running() -> list[dict[str, object]]:
        out = taskctl(project, "inspect", "active", "-d", worker.hostname, "--json")
        return json.loads(out.stdout)[worker.hostname] if out.returncode == 0 else []

    [active] = wait_for(running, 20, "the task running", lambda: worker.log)
    assert active["id"] == task_id and active["name"] == REPORT_PID
    assert isinstance(active["worker_pid"], int)

    revoked = taskctl(project, "revoke", task_id, "--terminate", "-d", worker.hostname)
    assert revoked.returncode == 0, revoked.stderr
    assert f"-> {worker.hostname}: OK terminate: {task_id}" in revoked.stdout
    worker.wait_log(rf"revoked with terminate=True: killing pool child {active['worker_pid']}")
    row = project.wait_results([task_id])[task_id]
    assert row["status"] == "REVOKED"
    # The worker goes on: the killed child is replaced and the next task runs.
    again = project.send(REPORT_PID)
    worker.wait_log(rf"\[{again}\] succeeded", timeout=20)
    stats = json.loads(taskctl(project, "inspect", "stats", "-d", worker.hostname,
                              "--json").stdout)[worker.hostname]
    assert stats["pool"]["max-concurrency"] == 2
    assert len(stats["pool"]["processes"]) == 2
    assert active["worker_pid"] not in stats["pool"]["processes"]
