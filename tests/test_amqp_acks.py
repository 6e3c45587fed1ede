"""On RabbitMQ the worker acknowledges what finished within 10 ms together: one ``basic.ack``
with ``multiple`` covers a run of finished messages, and never one still held."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from django_tasks_q import broker, message
from django_tasks_q.execute import Outcome
from django_tasks_q.transport import amqp as amqp_transport
from django_tasks_q.worker import child
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.pool import Job, SoloPool

from . import tasks  # noqa: F401 - registers the task run below
from .conftest import require
from .running import run_consumer

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def qname(settings: Any) -> Iterator[str]:
    name = f"acks-{uuid.uuid4().hex[:8]}"
    settings.TASKS_Q = {"BROKER_URL": require("amqp"), "QUEUES": [name], "DEFAULT_QUEUE": name}
    yield name
    broker.publisher().close()
    with broker.connection() as conn, contextlib.suppress(Exception):  # best-effort cleanup
        conn.default_channel.queue_delete(name)


@pytest.fixture
def acks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every ``basic.ack`` the worker sends: (delivery tag, multiple)."""
    sent: list[tuple[int, bool]] = []
    original = amqp_transport.ack

    def ack(message: Any, multiple: bool = False) -> None:
        sent.append((message.delivery_tag, multiple))
        original(message, multiple)

    monkeypatch.setattr(amqp_transport, "ack", ack)
    return sent


class EndingTogether(SoloPool):
    """Runs each job inline, and reports them ``together`` at a time, from one turn of the
    loop, as a busy prefork pool reports jobs that ended while the worker was busy."""

    def __init__(self, together: int) -> None:
        super().__init__(1, "acks", on_done=lambda job, outcome: None)
        self.together = together
        self.ended: list[tuple[Job, Outcome]] = []

    def submit(self, job: Job) -> None:
        self.ended.append((job, child.run_one(job.msg, self.hostname)))
        if len(self.ended) == self.together:
            ended, self.ended = self.ended, []
            for job_, outcome in ended:
                self.on_done(job_, outcome)

    def active(self) -> list[Job]:
        return [job for job, _ in self.ended]


class EndingApart(SoloPool):
    """Runs each job inline, and reports each a millisecond after the one before, from a turn
    of the loop of its own, as a prefork pool reports jobs that end one by one."""

    def __init__(self) -> None:
        super().__init__(1, "acks", on_done=lambda job, outcome: None)
        self.due = 0.0

    def submit(self, job: Job) -> None:
        outcome = child.run_one(job.msg, self.hostname)
        self.due = max(self.due, time.monotonic()) + 0.001
        self.hub.call_later(self.due - time.monotonic(), self.on_done, job, outcome)

    def active(self) -> list[Job]:
        return []


def publish(qname: str, eta: datetime | None = None) -> str:
    msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.add", args=[2, 3],
                              kwargs={}, queue=qname, eta=eta)
    body, headers, props = message.encode(msg)
    broker.publisher().publish(body, headers, props, qname)
    return msg.id


def left(qname: str) -> list[str]:
    """The ids of the messages in ``qname`` (taken off it)."""
    with broker.connection() as conn:
        channel = conn.default_channel
        ids = []
        while (raw := channel.basic_get(qname, no_ack=True)) is not None:
            ids.append(raw.headers["id"])
        return ids


def test_tasks_ending_in_one_turn_are_acknowledged_by_one_multiple_ack(
        qname: str, acks: list[tuple[int, bool]]) -> None:
    for _ in range(6):
        publish(qname)
    consumer = Consumer([qname], EndingTogether(3), "acks", prefetch=8)
    done = run_consumer(consumer, 6, timeout=20)
    assert len(done) == 6
    # Tags 1-3 end together, then 4-6, within 10 ms: one frame, or two if the 10 ms ran out
    # in between.
    assert acks in ([(3, True), (6, True)], [(6, True)])
    assert left(qname) == []  # every one was acknowledged: none came back


def test_tasks_ending_one_by_one_close_together_share_a_multiple_ack(
        qname: str, acks: list[tuple[int, bool]]) -> None:
    for _ in range(6):
        publish(qname)
    consumer = Consumer([qname], EndingApart(), "acks", prefetch=8)
    done = run_consumer(consumer, 6, timeout=20)
    assert len(done) == 6
    # Each ended in a turn of its own, a millisecond after the one before: one frame, or two
    # if the 10 ms ran out in between, each covering the run before it.
    assert len(acks) <= 2 and acks[-1] == (6, True), acks
    assert all(multiple for _, multiple in acks), acks
    assert left(qname) == []


def test_a_message_held_until_later_is_never_covered_by_a_multiple_ack(
        qname: str, acks: list[tuple[int, bool]]) -> None:
    # First in the channel's order, held in memory (due in 20 s), so it stops the run.
    held = publish(qname, eta=datetime.now(UTC) + timedelta(seconds=20))
    for _ in range(5):
        publish(qname)
    consumer = Consumer([qname], EndingTogether(5), "acks", prefetch=8)
    started = time.monotonic()
    # Runs on while the held one waits (a sixth task never comes), then stops cold.
    done = run_consumer(consumer, 6, timeout=3)
    assert len(done) == 5 and time.monotonic() - started < 15
    # Tags 2-6 ended in one turn behind the held tag 1: each acknowledged on its own. The
    # stop gave the held one back; a multiple ack over it would have lost it.
    assert acks == [(tag, False) for tag in range(2, 7)]
    assert left(qname) == [held]
