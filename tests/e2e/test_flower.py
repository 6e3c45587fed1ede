"""End-to-end: a real Flower watches a real ``taskworker -E`` on Redis and on RabbitMQ."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from .conftest import MakeProject, Project, Worker, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ADD = "testproject.testapp.tasks.add"
CHARGE = "testproject.testapp.tasks.charge_payment"


class Flower(Worker):
    """``celery flower`` on a free loopback port, pointed at the project's broker."""

    ready_pattern = r"Visit me at http"

    def __init__(self, project: Project) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        # Flower's HTTP API answers without credentials only when told to (loopback only here).
        env = {**project.env, "FLOWER_UNAUTHENTICATED_API": "true"}
        super().__init__([f"--broker={project.broker_url}", "flower", f"--port={self.port}",
                          "--address=127.0.0.1"], env, project.tmp / "flower.log",
                         f"flower:{self.port}", command=("-m", "celery"))

    def get(self, path: str) -> Any:
        """The JSON Flower answers ``GET path`` with."""
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return json.loads(response.read())


@pytest.fixture(params=["redis", "amqp"])
def watched(request: pytest.FixtureRequest, make_project: MakeProject) -> Project:
    """The example project on Redis or RabbitMQ."""
    return make_project(request.param)


def start(project: Project) -> tuple[Flower, Worker]:
    """Flower, then a worker with events on, once Flower lists it online (from heartbeats)."""
    flower = Flower(project)
    project.workers.append(flower)  # stopped at teardown like the workers
    flower.wait_ready()
    worker = project.worker("-E")
    wait_for(lambda: flower.get("/api/workers?status=1").get(worker.hostname), 30,
             "Flower to list the worker online", lambda: project.logs(), interval=0.3)
    return flower, worker


def test_flower_shows_our_worker_online_and_the_tasks_it_ran(watched: Project) -> None:
    flower, worker = start(watched)
    added = watched.send(ADD, 2, 3)
    failed = watched.send(CHARGE, watched.create_order("someone@declined.example"))

    def finished() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks")
        done = {task_id: task for task_id, task in tasks.items()
                if task["state"] in ("SUCCESS", "FAILURE")}
        return done if {added, failed} <= set(done) else None

    tasks = wait_for(finished, 30, "Flower to see both tasks finish", watched.logs, 0.3)

    ok = tasks[added]
    assert (ok["state"], ok["name"], ok["worker"]) == ("SUCCESS", ADD, worker.hostname)
    assert (ok["args"], ok["kwargs"], ok["result"]) == ("[2, 3]", "{}", "5")
    assert ok["received"] <= ok["started"] <= ok["succeeded"] and ok["runtime"] >= 0
    bad = tasks[failed]
    assert (bad["state"], bad["worker"]) == ("FAILURE", worker.hostname)
    assert bad["exception"].startswith("PaymentDeclined('card declined for order")
    assert "raise PaymentDeclined" in bad["traceback"]  # it crossed from the pool child

    # The workers page's data: online, with the counts of the events it sent.
    page = {w["hostname"]: w for w in flower.get("/workers?json=1")["data"]}
    ours = page[worker.hostname]
    assert ours["status"] is True and ours["sw_ident"] == "django-tasks-q"
    assert (ours["task-succeeded"], ours["task-failed"]) == (1, 1)

    # A warm shutdown says worker-offline: Flower shows it at once, with no heartbeat to expire.
    worker.stop()
    wait_for(lambda: flower.get("/api/workers?status=1").get(worker.hostname) is False, 10,
             "Flower to show the worker offline", watched.logs, 0.3)


def test_flower_inspects_our_worker_through_remote_control(watched: Project) -> None:
    flower, worker = start(watched)

    def inspected() -> dict[str, Any] | None:
        try:
            answer = flower.get(f"/api/workers?refresh=1&workername={worker.hostname}")
        except urllib.error.HTTPError:  # 503 or 404 until the worker answers
            return None
        info = answer.get(worker.hostname) or {}
        return info if {"stats", "active_queues", "registered"} <= set(info) else None

    info = wait_for(inspected, 30, "Flower's inspect of the worker", watched.logs, 0.5)

    assert {"total", "broker", "pid", "pool"} <= set(info["stats"])
    assert [q["name"] for q in info["active_queues"]] == [watched.queue]
    assert ADD in info["registered"]
    assert flower.get("/api/workers")[worker.hostname]["stats"]["pid"] == worker.pid
