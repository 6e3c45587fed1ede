"""One contract, every broker: what the worker relies on from Redis, RabbitMQ and django://."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection as db_connection
from kombu import Consumer

from django_tasks_q import broker, message
from django_tasks_q.execute import Outcome
from django_tasks_q.worker.consumer import Consumer as WorkerConsumer
from django_tasks_q.worker.pool import Job, SoloPool

from . import tasks  # noqa: F401 - registers the tasks run below
from .conftest import require

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]


def _django_id() -> str:
    return f"django-{db_connection.vendor}"


@pytest.fixture(params=["redis", "amqp", "django"], ids=lambda p: p)
def target(request: pytest.FixtureRequest, settings: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(url, transport options) of a real broker, configured as TASKS_Q's broker."""
    kind = request.param
    options: dict[str, Any] = {}
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    elif kind == "amqp":
        url = require("amqp")
    else:
        url, options = "django://", {"visibility_timeout": 2, "polling_interval": 0.05}
    settings.TASKS_Q = {"BROKER_URL": url, "BROKER_OPTIONS": options}
    yield url, options


@pytest.fixture
def qname(target: tuple[str, dict[str, Any]]) -> Iterator[str]:
    name = f"contract-{uuid.uuid4().hex[:8]}"
    yield name
    with broker.connection() as conn, contextlib.suppress(Exception):  # best-effort cleanup
        broker.queue(name)(conn.default_channel).delete()


def publish(qname: str, name: str = "tests.tasks.multiply", args: list[Any] | None = None,
            priority: int | None = None) -> message.TaskMessage:
    msg = message.TaskMessage(id=message.new_id(), name=name, args=args or [2, 3], kwargs={},
                              queue=qname, priority=priority)
    body, headers, props = message.encode(msg)
    broker.publisher().publish(body, headers, props, qname, priority)
    return msg


def receive(conn: Any, qname: str, n: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    consumer = Consumer(conn.channel(), [broker.queue(qname)], accept=["json"],
                        on_message=got.append, prefetch_count=n)
    consumer.consume()
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.2)
    consumer.cancel()  # later deliveries (requeued ones) go to the next consumer
    return got


def test_published_message_arrives_intact(qname: str) -> None:
    sent = publish(qname, args=[1, "two", {"three": [3]}])
    with broker.connection() as conn:
        [raw] = receive(conn, qname, 1)
        got = message.decode(raw.headers, raw.decode(), queue=qname)
        raw.ack()
    assert (got.id, got.name, got.args) == (sent.id, sent.name, [1, "two", {"three": [3]}])
    assert raw.content_type == "application/json"


def test_rejected_with_requeue_comes_back_and_without_is_gone(qname: str) -> None:
    first, second = publish(qname), publish(qname)
    with broker.connection() as conn:
        a, b = receive(conn, qname, 2)
        a.reject(requeue=True)
        b.reject(requeue=False)
        [again] = receive(conn, qname, 1)
        assert again.headers["id"] == first.id
        again.ack()
        assert receive(conn, qname, 1, timeout=1.0) == []
    assert second.id != first.id


def test_unacked_message_is_delivered_again_after_its_consumer_goes(qname: str) -> None:
    sent = publish(qname)
    conn = broker.connection()
    [held] = receive(conn, qname, 1)
    assert held.headers["id"] == sent.id
    conn.release()  # gone without an ack
    with broker.connection() as conn2:
        [again] = receive(conn2, qname, 1, timeout=15.0)
        again.ack()
    assert again.headers["id"] == sent.id


def test_messages_outlive_the_publishing_connection(qname: str) -> None:
    ids = [publish(qname).id for _ in range(3)]
    broker.publisher().close()
    with broker.connection() as conn:
        got = receive(conn, qname, 3)
        for m in got:
            m.ack()
    assert sorted(m.headers["id"] for m in got) == sorted(ids)


def test_worker_consumer_runs_tasks_and_acks(qname: str) -> None:
    """The real worker consumer (solo pool) drains a queue and leaves it empty."""
    sent = [publish(qname, args=[i, 2]) for i in range(5)]
    sent.append(publish(qname, name="nowhere.missing"))
    done: list[tuple[str, str]] = []
    pool = SoloPool(1, "contract", on_done=lambda j, o: None)
    consumer = WorkerConsumer([qname], pool, "contract", prefetch=4)
    settle = consumer.on_done

    def on_done(job: Job, outcome: Outcome) -> None:
        done.append((job.msg.id, outcome.status))
        settle(job, outcome)
        if len(done) == len(sent):
            consumer.stopping = True

    pool.on_done = on_done
    pool.start()
    consumer.run()
    assert sorted(done) == sorted([(m.id, "SUCCESS") for m in sent[:5]]
                                  + [(sent[5].id, "FAILURE")])
    with broker.connection() as conn:
        assert receive(conn, qname, 1, timeout=1.0) == []
