"""End-to-end tests: a plain Celery 5 app with a task named like the example project's ``add``.

A real ``celery worker`` runs it to show that our client's messages are Celery messages. It
knows nothing of Django: each run records what it received in Redis, for the test to read.

Environment: ``E2E_CELERY_BROKER`` (broker URL), ``E2E_CELERY_RECORD`` (Redis URL for the
records) and ``E2E_CELERY_KEY`` (the Redis list the records are pushed to).
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

app = Celery("e2e", broker=os.environ["E2E_CELERY_BROKER"])
app.conf.update(
    accept_content=["json"],
    task_ignore_result=True,
    worker_enable_remote_control=False,  # no pidbox queues left behind on RabbitMQ
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(name="testproject.testapp.tasks.add", bind=True)
def add(self: Any, x: int, y: int) -> int:
    """Record the call (id, arguments, protocol fields) and return the sum."""
    record = {
        "id": self.request.id, "args": list(self.request.args or []),
        "kwargs": dict(self.request.kwargs or {}), "x": x, "y": y, "result": x + y,
        "retries": self.request.retries, "root_id": self.request.root_id,
        "task": self.name, "ignore_result": self.request.ignore_result,
    }
    client = redis.Redis.from_url(os.environ["E2E_CELERY_RECORD"])
    key = os.environ["E2E_CELERY_KEY"]
    client.rpush(key, json.dumps(record))
    client.incr(key + ":count")
    return x + y
