"""Priorities on every broker: 0-9, higher first, none = 0; RabbitMQ queues with and without
them."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from bisect import bisect
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from kombu import Connection, Consumer, Exchange, Queue

from django_tasks_q import broker, client, message
from django_tasks_q.checks import check_settings
from django_tasks_q.models import ParkedMessage
from django_tasks_q.worker.consumer import Consumer as WorkerConsumer
from django_tasks_q.worker.parking import Parking
from django_tasks_q.worker.pool import SoloPool

from . import tasks
from .conftest import require
from .running import run_consumer

pytestmark = pytest.mark.django_db(transaction=True)

MULTIPLY = "tests.tasks.multiply"
# Interleaved, with repeats (first in, first out among equals) and messages sent without one.
SENT = [None, 3, 9, 0, 6, 1, 8, 4, 9, 2, 7, 5, None, 0, 7]
KOMBU_REDIS_STEPS = [0, 3, 6, 9]  # kombu's default priority_steps


@pytest.fixture(params=[pytest.param(kind, marks=pytest.mark.broker)
                        for kind in ("redis", "redis-10-steps", "amqp", "amqp-plain",
                                     "django")])
def target(request: pytest.FixtureRequest, settings: Any) -> str:
    """The kind of a real broker, configured as TASKS_Q's broker."""
    kind: str = request.param
    options: dict[str, Any] = {}
    if kind.startswith("redis"):
        url = request.getfixturevalue("redis_url")
        if kind == "redis-10-steps":
            options = {"priority_steps": list(range(10))}
    elif kind.startswith("amqp"):
        url = require("amqp")
        if kind == "amqp":
            options = {"max_priority": broker.MAX_PRIORITY}
    else:
        url, options = "django://", {"visibility_timeout": 5, "polling_interval": 0.05}
    settings.TASKS_Q = {"BROKER_URL": url, "BROKER_OPTIONS": options}
    return kind


@pytest.fixture
def qname(target: str) -> Iterator[str]:
    """A queue name never used before (RabbitMQ keeps durable queues of earlier runs)."""
    name = f"priority-{uuid.uuid4().hex[:8]}"
    yield name
    broker.publisher().close()
    with broker.connection() as conn, contextlib.suppress(Exception):  # best-effort cleanup
        broker.queue(name)(conn.default_channel).delete()


def expected_order(kind: str, sent: list[int | None]) -> list[int]:
    """Indexes of ``sent`` in the order they should be delivered (first in first among equals)."""
    def rank(priority: int | None) -> int:
        ours = priority or 0
        if kind == "redis":  # default steps: bands, not levels (wire value = 9 - ours)
            wire = broker.MAX_PRIORITY - ours
            return KOMBU_REDIS_STEPS[bisect(KOMBU_REDIS_STEPS, wire) - 1]
        if kind == "amqp-plain":  # declared without priorities: first in, first out
            return 0
        return -ours

    return sorted(range(len(sent)), key=lambda i: rank(sent[i]))


def receive_one_at_a_time(qname: str, n: int, timeout: float = 15.0) -> list[Any]:
    """``n`` messages, each acknowledged before the next is delivered (prefetch 1)."""
    got: list[Any] = []

    def on_message(raw: Any) -> None:
        got.append(raw)
        raw.ack()

    with broker.connection() as conn:
        consumer = Consumer(conn.channel(), broker.declare(conn, [qname]).queues, accept=["json"],
                            on_message=on_message, prefetch_count=1)
        consumer.consume()
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
        consumer.cancel()
    return got


def run_worker(queues: list[str], expected: int, timeout: float = 30.0
               ) -> list[tuple[message.TaskMessage, str]]:
    """Run the worker's consumer (solo pool, prefetch 1) until ``expected`` jobs finished."""
    pool = SoloPool(1, "priority", on_done=lambda j, o: None)
    consumer = WorkerConsumer(queues, pool, "priority", prefetch=1)
    return [(job.msg, outcome.status)
            for job, outcome in run_consumer(consumer, expected, timeout)]


def test_higher_priority_is_delivered_first(target: str, qname: str) -> None:
    ids = [client.send_task(MULTIPLY, [i, 1], queue=qname, priority=p).id
           for i, p in enumerate(SENT)]

    got = [raw.headers["id"] for raw in receive_one_at_a_time(qname, len(SENT))]

    assert got == [ids[i] for i in expected_order(target, SENT)]


def test_the_worker_sees_the_priority_sent_even_after_a_retry(target: str, qname: str) -> None:
    """Redis carries 9 - priority; the worker, parking and retries see (and resend) ours."""
    sent = [client.send_task(MULTIPLY, [i, 1], queue=qname, priority=p)
            for i, p in enumerate(SENT)]
    retried = tasks.retries_then_ok.apply_async(args=(1,), queue=qname, priority=7)

    done = run_worker([qname], expected=len(sent) + 2)

    priorities = {msg.id: (msg.priority or 0) for msg, _ in done}
    assert priorities == {**{r.id: p or 0 for r, p in zip(sent, SENT, strict=True)},
                          retried.id: 7}
    assert [(msg.retries, status) for msg, status in done if msg.id == retried.id] == [
        (0, "RETRY"), (1, "SUCCESS")]
    first_runs = [msg.id for msg, _ in done if msg.id != retried.id]
    assert first_runs == [sent[i].id for i in expected_order(target, SENT)]


def test_a_parked_message_keeps_its_priority(target: str, qname: str) -> None:
    msg = message.TaskMessage(id=message.new_id(), name=MULTIPLY, args=[2, 3], kwargs={},
                              queue=qname, priority=7,
                              eta=timezone.now() + timedelta(hours=1))
    parking = Parking("priority")
    parking.park([msg])
    ParkedMessage.objects.update(due_at=timezone.now() - timedelta(seconds=1))

    assert parking.release_due() == 1
    [raw] = receive_one_at_a_time(qname, 1)

    assert broker.received_priority(raw) == 7
    # Only the wire value is inverted on Redis.
    assert raw.properties["priority"] == (2 if target.startswith("redis") else 7)


def plain_queue(name: str, **arguments: Any) -> Queue:
    """``name`` as Celery declares it by default (no arguments), and as we do without
    ``max_priority``; or with ``arguments``."""
    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name, durable=True,
                 queue_arguments=arguments or None)


def send_and_run(name: str, priorities: list[int | None]
                 ) -> tuple[list[str], list[tuple[message.TaskMessage, str]]]:
    """Send one task per priority to queue ``name``, then run them: their ids, and what ran."""
    sent = [client.send_task(MULTIPLY, [i, 2], queue=name, priority=p).id
            for i, p in enumerate(priorities)]
    return sent, run_worker([name], expected=len(sent))


@contextlib.contextmanager
def existing(amqp_url: str, declared: Queue, before: bool = True) -> Iterator[str]:
    """``declared`` on RabbitMQ (``before`` the test, or by it), deleted after it, and the
    publisher closed."""
    if before:
        with Connection(amqp_url) as conn:
            declared(conn.default_channel).declare()
    try:
        yield declared.name
    finally:
        broker.publisher().close()
        with Connection(amqp_url) as conn:
            declared(conn.default_channel).delete()


def broker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "django_tasks_q.broker" and r.levelno >= logging.WARNING]


@pytest.mark.broker
def test_a_queue_declared_without_x_max_priority_is_used_with_one_warning(
        amqp_url: str, settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.TASKS_Q = {"BROKER_URL": amqp_url, "BROKER_OPTIONS": {"max_priority": 9}}
    caplog.set_level(logging.WARNING, logger="django_tasks_q.broker")
    # As Celery (without task_queue_max_priority) declared it.
    with existing(amqp_url, plain_queue(f"priority-legacy-{uuid.uuid4().hex[:8]}")) as name:
        sent, done = send_and_run(name, [1, 9, None])
        later = client.send_task(MULTIPLY, [5, 5], queue=name, priority=9).id
        done += run_worker([name], expected=1)

    assert sorted((msg.id, status) for msg, status in done) == sorted(
        (task_id, "SUCCESS") for task_id in [*sent, later])
    warnings = broker_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert repr(name) in warnings[0] and "x-max-priority=9" in warnings[0]
    assert "not honour" in warnings[0] and "task_queue_max_priority = 9" in warnings[0]


@pytest.mark.broker
def test_queues_are_declared_as_celery_declares_them_and_an_ignored_priority_is_named_once(
        amqp_url: str, settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.TASKS_Q = {"BROKER_URL": amqp_url}
    caplog.set_level(logging.WARNING, logger="django_tasks_q.broker")
    name = f"priority-plain-{uuid.uuid4().hex[:8]}"
    with existing(amqp_url, plain_queue(name), before=False):
        # Declared by the first send; Celery's declaration (no arguments) is the same as ours:
        # RabbitMQ accepts it.
        sent, done = send_and_run(name, [None, 9, 3])
        with Connection(amqp_url) as conn:
            assert plain_queue(name)(conn.default_channel).declare() == name

    assert [(msg.id, status) for msg, status in done] == [(i, "SUCCESS") for i in sent]
    warnings = broker_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert repr(name) in warnings[0] and "priority=9" in warnings[0]
    assert "TASKS_Q['BROKER_OPTIONS']['max_priority'] = 9" in warnings[0]


@pytest.mark.broker
def test_a_queue_declared_with_priorities_earlier_keeps_them_without_a_warning(
        amqp_url: str, settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.TASKS_Q = {"BROKER_URL": amqp_url}
    caplog.set_level(logging.INFO, logger="django_tasks_q.broker")
    # As an earlier version of this app declared every queue (and Celery's
    # task_queue_max_priority does).
    name = f"priority-earlier-{uuid.uuid4().hex[:8]}"
    with existing(amqp_url, plain_queue(name, **{"x-max-priority": 9})):
        sent, done = send_and_run(name, [1, 9, None])

    assert [msg.id for msg, _ in done] == [sent[1], sent[0], sent[2]]
    assert broker_warnings(caplog) == []
    assert any(repr(name) in r.getMessage() and "using it as it is" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("value", [0, 256, 2.5, "9", True])
def test_a_max_priority_that_rabbitmq_cannot_use_is_named(value: Any, settings: Any) -> None:
    settings.TASKS_Q = {"BROKER_OPTIONS": {"max_priority": value}}
    [error] = [e for e in check_settings() if e.id == "django_tasks_q.E014"]
    assert repr(value) in error.msg and "from 1 to 255" in error.msg


@pytest.mark.parametrize("bad", [-1, 10, 2.5, "9", True])
def test_a_priority_outside_0_to_9_is_refused_at_enqueue(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"priority must be an int from 0 .* to 9"):
        tasks.multiply.apply_async(args=(1, 2), priority=bad)
    with pytest.raises(ValueError, match=r"priority must be an int from 0 .* to 9"):
        client.send_task(MULTIPLY, [1, 2], priority=bad)
