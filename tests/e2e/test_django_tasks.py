"""End-to-end: ``django.tasks`` tasks enqueued by one process and run by a real ``taskworker``.

The caller's side is a short Python process on the example project's settings (``TASKS`` on
``TasksQBackend``); the tasks live in ``testproject/testapp/django_tasks.py``, which the worker
imports when their first message arrives. Needs Django 6.0 or newer.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from typing import Any

import django
import pytest

from .conftest import PYTHON, REPO, Project, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(django.VERSION < (6, 0), reason="django.tasks needs Django 6.0"),
    pytest.mark.parametrize("project", ["django-sqlite"], indirect=True),
]

# Runs in the caller's process: enqueues, or reads results, and prints one JSON line.
CALLER = """
import json, sys
from datetime import timedelta

import django

django.setup()
from django.tasks.signals import task_enqueued
from django.utils import timezone

from testproject.testapp import django_tasks as shop

queue, op, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
heard = []
task_enqueued.connect(lambda sender, task_result, **kw: heard.append(
    [sender.__name__, task_result.id, str(task_result.status)]), weak=False)


def enqueue(name, *args, **using):
    return getattr(shop, name).using(queue_name=queue, **using).enqueue(*args).id


def result(name, result_id):
    r = getattr(shop, name).get_result(result_id)
    times = [r.enqueued_at, r.started_at, r.finished_at, r.last_attempted_at]
    return {"status": str(r.status), "value": r.return_value if r.status == "SUCCESSFUL" else None,
            "errors": [[e.exception_class_path, e.traceback] for e in r.errors],
            "worker_ids": r.worker_ids, "attempts": r.attempts,
            "times": [t.isoformat() if t else None for t in times]}


if op == "enqueue":  # arg: [[name, args, seconds until run_after or null], ...]
    ids = []
    for name, args, delay in arg:
        using = {"run_after": timezone.now() + timedelta(seconds=delay)} if delay else {}
        ids.append(enqueue(name, *args, **using))
    answer = {"ids": ids, "heard": heard}
else:  # arg: [[name, id], ...]
    answer = [result(name, result_id) for name, result_id in arg]
print(json.dumps(answer))
"""


def caller(project: Project, op: str, arg: Any) -> Any:
    """Run ``op`` in a caller's process on the project's database and broker."""
    done = subprocess.run([PYTHON, "-c", CALLER, project.queue, op, json.dumps(arg)], cwd=REPO,
                          env=project.env, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise AssertionError(f"caller {op} failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def enqueue(project: Project, *tasks: tuple[str, list[Any]] | tuple[str, list[Any], float],
            ) -> list[str]:
    sent = caller(project, "enqueue", [[t[0], t[1], t[2] if len(t) > 2 else None]
                                       for t in tasks])
    # task_enqueued was sent in the caller, by the backend's class, with a READY result.
    assert sent["heard"] == [["TasksQBackend", i, "READY"] for i in sent["ids"]]
    return list(sent["ids"])


def results(project: Project, names: list[str], ids: list[str]) -> list[dict[str, Any]]:
    return list(caller(project, "results", [[n, i] for n, i in zip(names, ids, strict=True)]))


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_sync_async_and_context_tasks_run_on_each_pool(project: Project, pool: str) -> None:
    worker = project.worker(pool=pool, concurrency=1 if pool == "solo" else 2)
    order = project.create_order("ada@example.com")
    names = ["add", "order_total", "whoami", "refuse"]
    ids = enqueue(project, ("add", [2, 3]), ("order_total", [order]), ("whoami", ["hi"]),
                  ("refuse", ["out of stock"]))

    project.wait_results(ids)
    added, total, context, refused = results(project, names, ids)

    assert (added["status"], added["value"]) == ("SUCCESSFUL", 5)
    assert added["worker_ids"] == [worker.hostname] and added["attempts"] == 1
    enqueued_at, started_at, finished_at, last_attempted_at = map(_time, added["times"])
    assert enqueued_at <= started_at <= finished_at and last_attempted_at == started_at
    assert (total["status"], total["value"]) == ("SUCCESSFUL", "0.00")  # the async ORM
    assert context["value"] == {"label": "hi", "id": ids[2], "attempt": 1, "status": "RUNNING",
                                "worker_ids": [worker.hostname]}
    assert refused["status"] == "FAILED"
    [(path, traceback)] = refused["errors"]
    assert path == "builtins.ValueError" and "ValueError: out of stock" in traceback
    # Django's signals, in the worker, once per attempt, sent by the backend's class.
    for task_id, status in zip(ids, ["SUCCESSFUL"] * 3 + ["FAILED"], strict=True):
        worker.wait_log(rf"django-task started TasksQBackend {task_id} RUNNING attempts=1")
        worker.wait_log(rf"django-task finished TasksQBackend {task_id} {status}")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_retries_soft_time_limit_and_run_after(project: Project, pool: str) -> None:
    worker = project.worker("--soft-time-limit", "1", pool=pool)
    tasks: list[tuple[str, list[Any]] | tuple[str, list[Any], float]] = [
        ("flaky_warehouse", [7]), ("nap", [30]), ("add", [1, 1], 4)]
    if django.VERSION >= (6, 1):
        tasks.append(("give_up_after_one_retry", []))
    ids = enqueue(project, *tasks)
    flaky, nap, later = ids[:3]

    wait_for(lambda: project.results([later])[0]["status"] == "PENDING", 5, "the PENDING row")
    rows = project.wait_results(ids, timeout=30)
    found = results(project, [t[0] for t in tasks], ids)

    # Three attempts on the "retrying" backend's OPTIONS; each one reported by task_finished.
    assert found[0]["value"] == {"order_id": 7, "attempt": 3} and found[0]["attempts"] == 3
    assert re.findall(rf"django-task finished TasksQBackend {flaky} (\w+)", worker.log) == [
        "READY", "READY", "SUCCESSFUL"]
    # The soft limit stops a coroutine inside its event loop, on either pool.
    assert rows[nap]["result"]["exc_type"] == "SoftTimeLimitExceeded"
    assert found[1]["errors"][0][0] == "django_tasks_q.exceptions.SoftTimeLimitExceeded"
    assert "in nap" in found[1]["errors"][0][1]
    # run_after became the message's eta.
    enqueued_at, started_at, _, _ = map(_time, found[2]["times"])
    assert found[2]["value"] == 2 and (started_at - enqueued_at).total_seconds() >= 3.5
    if django.VERSION >= (6, 1):  # @task(max_retries=1, autoretry_for=...) options
        assert found[3]["status"] == "FAILED" and found[3]["attempts"] == 2
        assert "still down (attempt 2)" in found[3]["errors"][0][1]


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)
