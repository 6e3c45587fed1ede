"""End-to-end: the wire format is Celery's, both ways, with real Celery 5 clients and workers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from ..conftest import require
from .conftest import REDIS_DB, MakeProject, Project, Worker, wait_for, with_db

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ADD = "testproject.testapp.tasks.add"
CELERY_BROKER_DB = REDIS_DB + 1  # these tests' queues on the shared Redis
RECORD_DB = REDIS_DB + 2  # what the Celery worker records


@pytest.fixture(params=["redis", "amqp"])
def interop(request: pytest.FixtureRequest, make_project: MakeProject) -> Project:
    """The example project on Redis or RabbitMQ, with a queue of its own."""
    if request.param == "redis":
        return make_project("redis", url=with_db(require("redis"), CELERY_BROKER_DB))
    return make_project("amqp")


def test_a_celery_client_send_task_runs_on_our_worker(interop: Project) -> None:
    from celery import Celery

    worker = interop.worker()
    app = Celery("e2e-client", broker=interop.broker_url)
    # A Celery client declares the queue it sends to, as Celery does by default: as ours.
    try:
        sent = app.send_task(ADD, (2, 3), queue=interop.queue)
    finally:
        app.close()

    row = interop.wait_results([sent.id])[sent.id]

    assert (row["status"], row["result"], row["task_name"]) == ("SUCCESS", 5, ADD)
    assert (row["args"], row["kwargs"], row["retries"]) == ([2, 3], {}, 0)
    assert (row["queue"], row["worker"]) == (interop.queue, worker.hostname)
    worker.wait_log(rf"add\[{sent.id}\] succeeded", timeout=5)  # logged after the row
    assert worker.count(rf"add\[{sent.id}\] succeeded") == 1
    assert interop.count() == 0


@pytest.fixture
def records(interop: Project) -> Any:
    """A Redis list the Celery worker's task pushes one record per run to; deleted afterwards."""
    url = with_db(require("redis"), RECORD_DB)
    key = f"e2e-celery:{interop.queue}"
    client = redis.Redis.from_url(url)
    client.delete(key, key + ":count")
    yield url, key, client
    client.delete(key, key + ":count")
    client.close()


def test_our_messages_run_on_a_celery_worker(interop: Project, records: Any) -> None:
    url, key, client = records
    env = {**interop.env, "E2E_CELERY_BROKER": interop.broker_url, "E2E_CELERY_RECORD": url,
           "E2E_CELERY_KEY": key}
    hostname = f"celery.{interop.queue}@e2e"
    args = ["-A", "tests.e2e.celery_app", "worker", "-P", "solo", "-Q", interop.queue,
            "-n", hostname, "-l", "INFO", "--without-gossip", "--without-mingle"]
    celery = Worker(args, env, interop.tmp / "celery.log", hostname, command=("-m", "celery"))
    celery.ready_pattern = rf"{hostname} ready\."
    interop.workers.append(celery)  # stopped at teardown like ours
    celery.wait_ready()

    # Task.apply_async, as application code sends it, and send_task by name with kwargs.
    applied = interop.producer.call("apply_async", name=ADD, args=[2, 3], queue=interop.queue)
    by_name = interop.producer.call("send_task", name=ADD, args=[20], kwargs={"y": 22},
                                    queue=interop.queue)

    wait_for(lambda: int(client.get(key + ":count") or 0) >= 2, 20,
             "the Celery worker to run both tasks", lambda: celery.log)
    runs = {r["id"]: r for r in (json.loads(x) for x in client.lrange(key, 0, -1))}

    assert sorted(runs) == sorted([applied, by_name])
    assert (runs[applied]["args"], runs[applied]["kwargs"], runs[applied]["result"]) == (
        [2, 3], {}, 5)
    assert (runs[by_name]["args"], runs[by_name]["kwargs"], runs[by_name]["result"]) == (
        [20], {"y": 22}, 42)
    for run in runs.values():
        assert (run["task"], run["retries"], run["root_id"]) == (ADD, 0, run["id"])
    assert runs[applied]["ignore_result"] is False  # add keeps its results (results="all")
    assert celery.count(rf"Task {ADD}\[{applied}\] succeeded") == 1
    assert celery.count(rf"Task {ADD}\[{by_name}\] succeeded") == 1
    assert int(client.get(key + ":count")) == 2
    assert interop.count() == 0
