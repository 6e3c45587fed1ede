"""The ``django://`` broker on PostgreSQL: consumers wake by LISTEN/NOTIFY, not by a fixed poll."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, connections, transaction
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

from django_tasks_q.models import QueueMessage
from django_tasks_q.transport import pgnotify
from django_tasks_q.transport.django import Transport, register
from django_tasks_q.worker.consumer import Consumer as WorkerConsumer
from django_tasks_q.worker.pool import POOLS, Job
from django_tasks_q.worker.state import Watcher

from . import tasks
from .running import run_consumer

pytestmark = pytest.mark.django_db(transaction=True)

#: Long enough that a message received well before it was not found by the safety poll.
SAFETY = 5.0
on_postgres = [pytest.mark.broker, pytest.mark.postgres]  # the integration pass on PostgreSQL


@pytest.fixture(autouse=True)
def _registered() -> None:
    register()


@pytest.fixture
def qname() -> str:
    """A queue name no other test uses."""
    return f"q-{uuid.uuid4().hex[:10]}"


def kombu_queue(name: str) -> Queue:
    """The project's layout: a direct exchange named like the queue, routing key = name."""
    return Queue(name, Exchange(name, "direct"), routing_key=name)


class Idle:
    """A consumer of one queue whose channel went idle, resting until the safety poll."""

    def __init__(self, name: str, queue: Queue | None = None, **options: Any) -> None:
        self.conn = Connection("django://", transport_options={
            "safety_poll_interval": SAFETY, **options})
        self.received: list[tuple[Any, float]] = []  # (body, monotonic time)
        self.consumer = Consumer(self.conn, [queue or kombu_queue(name)],
                                 callbacks=[self._on_message])
        self.consumer.consume()

    @property
    def transport(self) -> Transport:
        transport: Transport = self.conn.transport
        return transport

    @property
    def listener(self) -> pgnotify.Listener:
        assert self.transport.listener is not None
        return self.transport.listener

    def _on_message(self, body: Any, message: Any) -> None:
        self.received.append((body, time.monotonic()))
        message.ack()

    def settle(self) -> None:
        """Drain until the channel found nothing while already listening: it now rests."""
        deadline = time.monotonic() + 5
        channel = self.consumer.channel
        while channel._quiet_until < time.monotonic() + SAFETY / 2:
            assert time.monotonic() < deadline, "the channel never came to rest"
            self.drain(0.2)

    def drain(self, seconds: float, until: int | None = None) -> None:
        """Drain for ``seconds``, or until ``until`` messages were received in all."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and (until is None or len(self.received) < until):
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.consumer.cancel()
        self.conn.release()


@pytest.fixture
def idle(postgres: None) -> Iterator[Callable[..., Idle]]:
    """Make idle consumers, closed after the test."""
    made: list[Idle] = []

    def make(name: str, queue: Queue | None = None, **options: Any) -> Idle:
        consumer = Idle(name, queue, **options)
        made.append(consumer)
        consumer.settle()
        return consumer

    yield make
    for consumer in made:
        consumer.close()


def publish(name: str, body: Any) -> float:
    """Publish from this thread's own database connection; the monotonic time it returned."""
    with Connection("django://") as conn:
        Producer(conn).publish(body, exchange=name, routing_key=name, declare=[kombu_queue(name)])
    return time.monotonic()


def in_thread(step: Callable[[], Any], delay: float = 0.0) -> threading.Thread:
    """Run ``step`` in a thread of its own (own database connection), after ``delay``."""
    def run() -> None:
        try:
            time.sleep(delay)
            step()
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def backend_pid(listener: pgnotify.Listener) -> int:
    assert listener.conn is not None
    return listener.conn.info.backend_pid


@pytest.mark.parametrize("queue", ["default", "a" * 200, "Ünïcode queue; DROP TABLE x;\"'"])
@pytest.mark.usefixtures("postgres")
@pytest.mark.broker
@pytest.mark.postgres
def test_channel_names_fit_identifiers_and_are_the_servers_names(queue: str) -> None:
    name = pgnotify.channel(queue)
    assert len(name.encode()) <= 63 and name.isidentifier() and name == name.lower()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {pgnotify.CHANNEL_SQL.format('%s')}", [queue])
        assert cursor.fetchone()[0] == name  # a fanout computes it in SQL


@pytest.mark.broker
@pytest.mark.postgres
def test_a_notification_wakes_a_waiting_consumer_long_before_the_safety_poll(
        idle: Callable[..., Idle], qname: str) -> None:
    consumer = idle(qname)
    heard = consumer.listener.heard
    sent: list[float] = []
    publisher = in_thread(lambda: sent.append(publish(qname, "wake up")), delay=0.3)
    consumer.drain(3, until=1)
    publisher.join()
    assert [body for body, _ in consumer.received] == ["wake up"]
    assert consumer.received[0][1] - sent[0] < 1.0  # the safety poll was SAFETY seconds away
    assert consumer.listener.heard > heard


@pytest.mark.broker
@pytest.mark.postgres
def test_the_event_loop_wakes_on_the_listener_socket(idle: Callable[..., Idle],
                                                     qname: str) -> None:
    consumer = idle(qname)
    hub = Hub()
    conn = consumer.conn
    conn.transport.register_with_event_loop(conn.connection, hub)

    def poll() -> None:  # as the worker polls: never waits, the hub does
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0)

    hub.call_repeatedly(0.1, poll)
    sent: list[float] = []
    publisher = in_thread(lambda: sent.append(publish(qname, "hub")), delay=0.3)
    loop = hub.create_loop()
    deadline = time.monotonic() + 3
    try:
        while not consumer.received and time.monotonic() < deadline:
            next(loop)
    finally:
        publisher.join()
        hub.close()
    assert [body for body, _ in consumer.received] == ["hub"]
    assert consumer.received[0][1] - sent[0] < 1.0


@pytest.mark.broker
@pytest.mark.postgres
def test_a_publish_rolled_back_wakes_nobody_and_is_never_delivered(
        idle: Callable[..., Idle], qname: str) -> None:
    consumer = idle(qname)
    heard = consumer.listener.heard

    def publish_and_roll_back() -> None:
        with transaction.atomic():
            publish(qname, "never")
            transaction.set_rollback(True)

    in_thread(publish_and_roll_back).join()
    consumer.drain(1.5)
    assert consumer.received == []
    assert consumer.listener.heard == heard
    assert not QueueMessage.objects.filter(queue=qname).exists()


@pytest.mark.broker
@pytest.mark.postgres
def test_a_publish_in_an_open_transaction_is_delivered_only_once_committed(
        idle: Callable[..., Idle], qname: str) -> None:
    consumer = idle(qname)
    heard = consumer.listener.heard
    published, commit = threading.Event(), threading.Event()
    committed: list[float] = []

    def publish_then_commit_later() -> None:
        with transaction.atomic():
            publish(qname, "after commit")
            published.set()
            commit.wait(10)
        committed.append(time.monotonic())

    publisher = in_thread(publish_then_commit_later)
    try:
        assert published.wait(5)
        consumer.drain(1.5)
        assert consumer.received == []  # neither woken nor found by a poll
        assert consumer.listener.heard == heard
    finally:
        commit.set()
        publisher.join()
    consumer.drain(3, until=1)
    assert [body for body, _ in consumer.received] == ["after commit"]
    assert consumer.received[0][1] - committed[0] < 1.0


@pytest.mark.broker
@pytest.mark.postgres
def test_a_lost_listener_falls_back_to_polling_and_listens_again(
        idle: Callable[..., Idle], qname: str, caplog: pytest.LogCaptureFixture) -> None:
    consumer = idle(qname)
    old_pid = backend_pid(consumer.listener)
    with caplog.at_level(logging.INFO, "django_tasks_q.transport.django"):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [old_pid])
        sent = publish(qname, "by poll")  # its notification may never arrive
        consumer.drain(3, until=1)
        assert [body for body, _ in consumer.received] == ["by poll"]
        assert consumer.received[0][1] - sent < 1.0  # polled, not left for the safety poll
        deadline = time.monotonic() + 10
        while not (consumer.listener.connected and consumer.listener.listening([qname])):
            assert time.monotonic() < deadline, "the listener never came back"
            consumer.drain(0.2)
    assert backend_pid(consumer.listener) != old_pid
    lost = [r for r in caplog.records if "no LISTEN connection" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert any("listening for new messages again" in r.getMessage() for r in caplog.records)
    consumer.settle()
    sent_again: list[float] = []
    publisher = in_thread(lambda: sent_again.append(publish(qname, "woken")), delay=0.3)
    consumer.drain(3, until=2)
    publisher.join()
    assert [body for body, _ in consumer.received] == ["by poll", "woken"]
    assert consumer.received[1][1] - sent_again[0] < 1.0


@pytest.mark.broker
@pytest.mark.postgres
def test_a_message_given_back_wakes_the_other_consumers(idle: Callable[..., Idle],
                                                        qname: str) -> None:
    with Connection("django://") as conn:
        holder = conn.SimpleQueue(kombu_queue(qname))
        holder.put("given back")
        message = holder.get(timeout=2)
        consumer = idle(qname)  # found nothing it could take: rests
        message.requeue()
        given = time.monotonic()
        consumer.drain(3, until=1)
    assert [body for body, _ in consumer.received] == ["given back"]
    assert consumer.received[0][1] - given < 1.0


@pytest.mark.broker
@pytest.mark.postgres
def test_a_fanout_wakes_every_bound_queue(idle: Callable[..., Idle]) -> None:
    exchange = Exchange(f"x-{uuid.uuid4().hex[:8]}", "fanout")
    consumers = [idle(name, Queue(name, exchange))
                 for name in (f"f-{uuid.uuid4().hex[:8]}" for _ in range(2))]
    with Connection("django://") as conn:
        Producer(conn).publish("everyone", exchange=exchange, declare=[exchange])
    sent = time.monotonic()
    for consumer in consumers:
        consumer.drain(3, until=1)
        assert [body for body, _ in consumer.received] == ["everyone"]
        assert consumer.received[0][1] - sent < 1.0


class Received(Watcher):
    """Notes when each task message reached the worker."""

    def __init__(self) -> None:
        self.at: list[float] = []

    def received(self, job: Job) -> None:
        self.at.append(time.monotonic())


@pytest.mark.broker
@pytest.mark.postgres
@pytest.mark.usefixtures("postgres")
def test_an_idle_worker_starts_a_task_as_soon_as_it_is_sent(settings: Any) -> None:
    settings.TASKS_Q = {**settings.TASKS_Q, "BROKER_URL": "django://",
                        "BROKER_OPTIONS": {"safety_poll_interval": SAFETY}}
    pool = POOLS["threads"](1, "t", on_done=lambda j, o: None)
    worker = WorkerConsumer(["default"], pool, "t", prefetch=1)
    watcher = Received()
    worker.watchers.append(watcher)
    sent: list[float] = []

    def send_when_idle() -> None:
        deadline = time.monotonic() + 5
        channel = None
        while time.monotonic() < deadline:  # the worker's channel rests: nothing polls it
            channel = worker._channel
            if channel is not None and channel._quiet_until > time.monotonic() + SAFETY / 2:
                break
            time.sleep(0.05)
        tasks.multiply.delay(6, 7)
        sent.append(time.monotonic())

    sender = in_thread(send_when_idle)
    try:
        done = run_consumer(worker, 1, timeout=10)
    finally:
        sender.join()
    assert [outcome.status for _, outcome in done] == ["SUCCESS"]
    assert watcher.at[0] - sent[0] < 1.0


def test_other_databases_and_notify_off_poll_as_before(qname: str) -> None:
    options = {} if connection.vendor != "postgresql" else {"notify": False}
    with Connection("django://", transport_options=options) as conn:
        queue = conn.SimpleQueue(kombu_queue(qname))
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.3)
        transport: Transport = conn.transport
        assert transport.listener is None
        channel = queue.consumer.channel
        assert channel._quiet_until <= time.monotonic()  # polled at every interval
        queue.put("polled")
        assert queue.get(timeout=2).payload == "polled"
