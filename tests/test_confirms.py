"""RabbitMQ publisher confirms, read asynchronously: a user's call does not wait for its
confirm; a waiting call, ``flush()``, a full window and a new connection do what they say."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.signals import request_finished
from django.utils import timezone
from kombu import Queue

from django_tasks_q import broker, execute, message
from django_tasks_q.admin import results as admin_results
from django_tasks_q.exceptions import EnqueueError
from django_tasks_q.models import TaskResult
from django_tasks_q.states import TaskState
from django_tasks_q.worker import child

from . import tasks  # noqa: F401 - registers the task sent below
from .conftest import require

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def amqp(settings: Any) -> Iterator[str]:
    """A fresh queue name; RabbitMQ is the broker, with a small confirm window."""
    name = f"confirms-{uuid.uuid4().hex[:8]}"
    settings.TASKS_Q = {"BROKER_URL": require("amqp"), "BROKER_OPTIONS": {"confirm_window": 8},
                        "DEFAULT_QUEUE": name, "QUEUES": [name]}
    yield name
    broker.publisher().close()
    with broker.connection() as conn, contextlib.suppress(Exception):  # best-effort cleanup
        conn.default_channel.queue_delete(name)


def send(qname: str, wait: bool = False) -> str:
    msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.multiply", args=[2, 3],
                              kwargs={}, queue=qname)
    body, headers, props = message.encode(msg)
    broker.publisher().publish(body, headers, props, qname, wait=wait)
    return msg.id


def ready(qname: str) -> int:
    with broker.connection() as conn:
        return broker.queue_size(conn.default_channel, qname)


def unconfirmed(pub: broker.Publisher) -> int:
    return len(pub._confirms or ()) + len(pub._outbox)


def _one_message_queue(name: str) -> None:
    """Declare ``name`` as a queue that holds one message and refuses (nacks) any beyond it."""
    with broker.connection() as conn:
        Queue(name, routing_key=name, durable=True, queue_arguments={
            "x-max-length": 1, "x-overflow": "reject-publish"})(conn.default_channel).declare()


def test_a_users_call_does_not_wait_and_flush_reads_every_confirm(amqp: str) -> None:
    pub = broker.publisher()
    ids = [send(amqp) for _ in range(5)]
    # Written, not waited for: nothing read them yet (the window is 8).
    assert unconfirmed(pub) == 5
    broker.flush()
    assert unconfirmed(pub) == 0
    assert ready(amqp) == len(set(ids)) == 5


def test_a_full_window_is_read_down_to_half_before_the_call_returns(amqp: str) -> None:
    pub = broker.publisher()
    for _ in range(7):
        send(amqp)
    assert unconfirmed(pub) == 7
    send(amqp)  # the eighth fills the window of 8: confirms are read until at most 4 are left
    assert unconfirmed(pub) <= 4
    assert ready(amqp) == 8


def test_a_window_of_one_waits_for_each_messages_confirm(amqp: str, settings: Any) -> None:
    settings.TASKS_Q = {**settings.TASKS_Q, "BROKER_OPTIONS": {"confirm_window": 1}}
    pub = broker.publisher()
    for _ in range(3):
        send(amqp)
        assert unconfirmed(pub) == 0


def test_a_waiting_call_returns_with_everything_confirmed(amqp: str) -> None:
    pub = broker.publisher()
    send(amqp)
    send(amqp)
    send(amqp, wait=True)
    assert unconfirmed(pub) == 0
    assert ready(amqp) == 3


def test_what_a_broken_connection_had_not_confirmed_is_sent_again(amqp: str) -> None:
    pub = broker.publisher()
    ids = [send(amqp) for _ in range(3)]
    assert pub._conn is not None
    # The socket goes away under the publisher, its three confirms unread.
    pub._conn.connection.sock.close()
    broker.flush()  # reconnects, sends the three again, reads their confirms
    assert unconfirmed(pub) == 0
    with broker.connection() as conn:
        channel = conn.default_channel
        got = []
        while (raw := channel.basic_get(amqp, no_ack=True)) is not None:
            got.append(raw.headers["id"])
    # At least once: each of them is there (twice if RabbitMQ had taken it before the break).
    assert set(got) == set(ids)


def test_refused_messages_raise_naming_them_and_publishing_goes_on(amqp: str) -> None:
    _one_message_queue(amqp)
    first, second, third = send(amqp), send(amqp), send(amqp)
    with pytest.raises(EnqueueError, match="RabbitMQ refused 2 task message") as info:
        broker.flush()
    assert second in str(info.value) and third in str(info.value)
    assert first not in str(info.value)
    with broker.connection() as conn:
        raw = conn.default_channel.basic_get(amqp, no_ack=True)
    assert raw is not None and raw.headers["id"] == first
    # The next call works on a fresh connection.
    send(amqp, wait=True)


def test_refusals_found_at_a_full_window_are_raised_once_all_are_confirmed(
        amqp: str, caplog: pytest.LogCaptureFixture) -> None:
    _one_message_queue(amqp)
    ids = [send(amqp) for _ in range(7)]
    with caplog.at_level(logging.ERROR), pytest.raises(EnqueueError) as info:
        send(amqp)  # fills the window of 8
    # Every refusal is named; none of the messages is reported lost with the connection.
    assert "RabbitMQ refused 7 task message" in str(info.value)
    assert all(task_id in str(info.value) for task_id in ids[1:])
    assert "had not confirmed" not in caplog.text
    assert ready(amqp) == 1


def test_a_task_run_ends_with_what_it_sent_confirmed(amqp: str) -> None:
    msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.fan_out", args=[3],
                              kwargs={}, queue=amqp)
    outcome = child.run_one(msg, "confirms@test")
    assert outcome.status == TaskState.SUCCESS
    assert unconfirmed(broker.publisher()) == 0
    assert ready(amqp) == 3


def test_a_task_whose_sends_were_refused_is_given_back(
        amqp: str, caplog: pytest.LogCaptureFixture) -> None:
    _one_message_queue(amqp)
    msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.fan_out", args=[3],
                              kwargs={}, queue=amqp)
    with caplog.at_level(logging.ERROR, "django_tasks_q.worker"):
        outcome = child.run_one(msg, "confirms@test")
    assert outcome.status == execute.REQUEUE  # run again, rather than lose what it sends
    assert f"tests.tasks.fan_out[{msg.id}]: RabbitMQ refused 2 task message" in caplog.text


def test_a_request_ends_with_what_it_sent_confirmed(amqp: str) -> None:
    send(amqp)
    send(amqp)
    request_finished.send(sender=None)
    assert unconfirmed(broker.publisher()) == 0
    assert ready(amqp) == 2


def test_the_admins_retry_returns_once_the_task_is_confirmed(amqp: str) -> None:
    row = TaskResult.objects.create(task_id="t-1", task_name="tests.tasks.multiply",
                                    status=TaskState.FAILURE, args=[2, 3], kwargs={},
                                    queue=amqp, date_done=timezone.now())
    new = admin_results.resend(row)
    assert unconfirmed(broker.publisher()) == 0
    with broker.connection() as conn:
        raw = conn.default_channel.basic_get(amqp, no_ack=True)
    assert raw is not None and raw.headers["id"] == new


def test_confirms_can_be_turned_off(amqp: str, settings: Any) -> None:
    settings.TASKS_Q = {"BROKER_URL": require("amqp"),
                        "BROKER_OPTIONS": {"confirm_publish": False}}
    pub = broker.publisher()
    send(amqp)
    assert pub._confirms is None and unconfirmed(pub) == 0
