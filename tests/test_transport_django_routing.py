"""The ``django://`` transport across processes: fanout, direct, remote control, expiry."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import celery
import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.pidbox import Mailbox

from django_tasks_q import broker
from django_tasks_q.models import QueueBinding, QueueMessage
from django_tasks_q.transport.bindings import State
from django_tasks_q.transport.django import Transport, register

pytestmark = pytest.mark.django_db(transaction=True)

Process = Callable[..., Connection]


@pytest.fixture(autouse=True)
def _registered() -> None:
    register()


@pytest.fixture
def process() -> Iterator[Process]:
    """Open ``django://`` connections that each stand in for a process of their own: exchanges
    and bindings kept in memory are not shared between them, as between processes."""
    opened: list[Connection] = []

    def _connect(**options: Any) -> Connection:
        transport = type("OwnProcess", (Transport,), {"global_state": State()})
        conn = Connection("django://", transport=transport,
                          transport_options={"polling_interval": 0.02, **options})
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.release()


@pytest.fixture
def name() -> str:
    """A prefix no other test uses."""
    return f"r-{uuid.uuid4().hex[:10]}"


def bindings_of(queue: str) -> set[tuple[str, str]]:
    """(exchange, routing key) of every stored binding of ``queue``."""
    return set(QueueBinding.objects.filter(queue=queue).values_list("exchange", "routing_key"))


def drain(conn: Connection, queues: list[Queue], count: int, timeout: float = 5.0) -> list[Any]:
    """Consume ``count`` messages from ``queues`` (declared on ``conn``) and ack them."""
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    with Consumer(conn, queues, callbacks=[on_message]):
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
    return got


def ping(state: Any, **kwargs: Any) -> dict[str, str]:
    """The remote-control command the nodes below answer."""
    return {"ok": "pong"}


class Listening:
    """A mailbox node answering on its own connection, in a thread: a worker stand-in."""

    def __init__(self, conn: Connection, hostname: str, box: Mailbox | None = None) -> None:
        self.conn, self.hostname = conn, hostname
        self.box = box or broker.mailbox()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            node = self.box(self.conn).Node(self.hostname, handlers={"ping": ping},
                                            channel=self.conn.channel())
            consumer = node.listen()
            self.ready.set()
            while not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    self.conn.drain_events(timeout=0.1)
            consumer.cancel()
        finally:
            connections.close_all()

    def __enter__(self) -> Listening:
        self.thread.start()
        assert self.ready.wait(10), "the node did not start listening"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.broker  # also runs on PostgreSQL in the integration pass
def test_fanout_reaches_every_queue_bound_by_another_process(process: Process, name: str) -> None:
    worker, client = process(), process()
    fanout = Exchange(f"{name}.fan", "fanout", durable=False)
    queues = [Queue(f"{name}-{n}", fanout) for n in range(3)]
    for queue in queues:
        queue(worker.default_channel).declare()
    # The client never declared those queues: only the stored bindings lead there.
    Producer(client).publish({"to": "all"}, exchange=fanout, declare=[fanout])
    assert QueueMessage.objects.filter(queue__startswith=name).count() == 3
    for queue in queues:
        assert drain(worker, [queue], 1) == [{"to": "all"}]
    assert not QueueMessage.objects.exists()


@pytest.mark.broker
def test_direct_exchange_reaches_a_queue_bound_by_another_process(
        process: Process, name: str) -> None:
    worker, client = process(), process()
    direct = Exchange(f"{name}.direct", "direct", durable=False)
    wanted, other = Queue(f"{name}-a", direct, routing_key="a"), Queue(f"{name}-b", direct,
                                                                       routing_key="b")
    for queue in (wanted, other):
        queue(worker.default_channel).declare()
    Producer(client).publish("for a", exchange=direct, routing_key="a", declare=[direct])
    Producer(client).publish("for nobody", exchange=direct, routing_key="z", declare=[direct])
    assert list(QueueMessage.objects.values_list("queue", flat=True)) == [wanted.name]
    assert drain(worker, [wanted], 1) == ["for a"]


@pytest.mark.broker
def test_topic_exchange_routes_by_stored_patterns(process: Process, name: str) -> None:
    worker, client = process(), process()
    topic = Exchange(f"{name}.topic", "topic", durable=False)
    queue = Queue(f"{name}-t", topic, routing_key="reports.*")
    queue(worker.default_channel).declare()
    producer = Producer(client)
    for key in ("reports.daily", "reports.daily.extra", "billing.daily"):
        producer.publish(key, exchange=topic, routing_key=key, declare=[topic])
    assert drain(worker, [queue], 1) == ["reports.daily"]
    assert not QueueMessage.objects.exists()


@pytest.mark.broker
def test_remote_control_round_trip_between_processes(process: Process, name: str) -> None:
    with Listening(process(), f"a@{name}"), Listening(process(), f"b@{name}"):
        client = process()
        replies = broker.mailbox(client)._broadcast("ping", reply=True, timeout=2)
        assert sorted(replies, key=str) == [{f"a@{name}": {"ok": "pong"}},
                                            {f"b@{name}": {"ok": "pong"}}]
        only_b = broker.mailbox(client)._broadcast("ping", reply=True, timeout=2,
                                                   destination=[f"b@{name}"])
        assert only_b == [{f"b@{name}": {"ok": "pong"}}]
        # The client's reply queue went with the collection (kombu deletes it after each).
        assert not QueueBinding.objects.filter(exchange="reply.celery.pidbox").exists()
        assert bindings_of(f"a@{name}.celery.pidbox") == {
            ("celery.pidbox", ""), ("", f"a@{name}.celery.pidbox")}
    # A node that stops consuming takes its auto-delete queue along.
    assert not QueueBinding.objects.filter(queue__endswith=f"{name}.celery.pidbox").exists()
    assert not QueueMessage.objects.exists()


@pytest.mark.broker
def test_celery_control_inspect_reaches_the_node(process: Process, name: str) -> None:
    app = celery.Celery("dtq-tests", broker="django://", set_as_current=False)
    app.conf.broker_transport_options = {"polling_interval": 0.02}
    with Listening(process(), f"w@{name}"), app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)  # our alias, as registered
        inspect = app.control.inspect(timeout=2, connection=conn)
        assert inspect.ping() == {f"w@{name}": {"ok": "pong"}}


def test_expired_queue_is_removed_without_any_reader(process: Process, name: str) -> None:
    dead, client, sweeper = process(), process(), process()
    fanout = Exchange(f"{name}.fan", "fanout", durable=False)
    abandoned = Queue(f"{name}-gone", fanout, expires=0.3, message_ttl=300)
    kept = Queue(f"{name}-kept", fanout)
    for queue in (abandoned, kept):
        queue(dead.default_channel).declare()
    producer = Producer(client)
    producer.publish("before", exchange=fanout, declare=[fanout])
    assert QueueMessage.objects.filter(queue=abandoned.name).count() == 1
    time.sleep(0.4)  # nobody consumed it: past its x-expires
    producer.publish("after", exchange=fanout, declare=[fanout])
    assert QueueMessage.objects.filter(queue=abandoned.name).count() == 1  # routed nowhere
    with pytest.raises(Empty):
        sweeper.SimpleQueue(f"{name}-elsewhere").get(timeout=0.1)  # any poll sweeps
    assert not bindings_of(abandoned.name)
    assert not QueueMessage.objects.filter(queue=abandoned.name).exists()
    assert bindings_of(kept.name) == {(fanout.name, "")}  # no x-expires: stays
    assert drain(dead, [kept], 2) == ["before", "after"]


def test_a_consumed_expiring_queue_stays_alive(process: Process, name: str) -> None:
    worker, client, sweeper = process(), process(), process()
    fanout = Exchange(f"{name}.fan", "fanout", durable=False)
    queue = Queue(f"{name}-live", fanout, expires=0.6)
    got: list[Any] = []
    with Consumer(worker, [queue], callbacks=[lambda body, m: (got.append(body), m.ack())]):
        deadline = time.monotonic() + 1.5  # over twice its x-expires
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                worker.drain_events(timeout=0.1)
        sweeper.default_channel.keep_queues_alive()
        assert bindings_of(queue.name) == {(fanout.name, ""), ("", queue.name)}
        Producer(client).publish("still here", exchange=fanout, declare=[fanout])
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                worker.drain_events(timeout=0.1)
    assert got == ["still here"]


def test_message_ttl_and_expiration_drop_old_messages(process: Process, name: str) -> None:
    conn, sweeper = process(), process()
    short = Queue(f"{name}-ttl", Exchange(f"{name}-ttl", "direct"), routing_key=f"{name}-ttl",
                  message_ttl=0.2)
    short(conn.default_channel).declare()
    producer = Producer(conn)
    producer.publish("stale", exchange=short.exchange, routing_key=short.routing_key)
    plain = conn.SimpleQueue(f"{name}-plain")
    plain.put("expiring", expiration=0.2)
    plain.put("lasting")
    time.sleep(0.3)
    sweeper.default_channel.keep_queues_alive()
    assert not QueueMessage.objects.filter(queue=short.name).exists()
    assert bindings_of(short.name)  # the TTL drops messages, not the queue
    message = plain.get(timeout=2)  # the expired message is dropped as it comes up
    assert message.payload == "lasting"
    message.ack()
    assert not QueueMessage.objects.exists()


def test_delete_and_auto_delete_remove_bindings_purge_keeps_them(
        process: Process, name: str) -> None:
    worker, other = process(), process()
    direct = Exchange(f"{name}.x", "direct", durable=False)
    durable = Queue(f"{name}-d", direct, routing_key="d")
    durable(worker.default_channel).declare()
    Producer(worker).publish("x", exchange=direct, routing_key="d")
    assert durable(other.default_channel).purge() == 1
    assert bindings_of(durable.name) == {(direct.name, "d")}  # as on AMQP: a purge keeps them
    durable(other.default_channel).delete()  # another process than the one that bound it
    assert not bindings_of(durable.name)
    temporary = Queue(f"{name}-t", direct, routing_key="t", auto_delete=True)
    consumer = Consumer(worker.channel(), [temporary])
    consumer.consume()
    Producer(other).publish("x", exchange=direct, routing_key="t", declare=[direct])
    assert bindings_of(temporary.name) == {(direct.name, "t")}
    consumer.cancel()  # the last consumer goes: so does an auto-delete queue
    assert not bindings_of(temporary.name)
    assert not QueueMessage.objects.exists()


def test_task_publish_looks_up_no_binding(settings: Any, name: str) -> None:
    settings.TASKS_Q = {"BROKER_URL": "django://"}
    pub = broker.publisher()
    pub.publish("[[], {}, {}]", {"id": "first"}, {}, name)  # declares the queue once
    try:
        with CaptureQueriesContext(connection) as queries:
            for n in range(3):
                pub.publish("[[], {}, {}]", {"id": str(n)}, {}, name)
        statements = [q["sql"] for q in queries.captured_queries]
        assert len(statements) == 3, statements
        # On PostgreSQL the INSERT notifies the queue's listeners in the same statement.
        on_postgres = connection.vendor == "postgresql"
        first = "WITH m AS (\n    INSERT INTO" if on_postgres else "INSERT INTO"
        assert all(sql.strip().startswith(first) and "queuemessage" in sql
                   and "queuebinding" not in sql for sql in statements), statements
        assert QueueMessage.objects.filter(queue=name).count() == 4
    finally:
        pub.close()


def test_an_idle_control_queue_is_not_asked_once_per_task(process: Process, name: str) -> None:
    conn = process(polling_interval=0.5)
    node = broker.mailbox(conn).Node(f"n@{name}", handlers={"ping": ping}, channel=conn.channel())
    node.listen()
    tasks = conn.SimpleQueue(f"{name}-tasks")
    for n in range(20):
        tasks.put(n)
    pidbox = f"n@{name}.celery.pidbox"
    with CaptureQueriesContext(connection) as queries:
        for n in range(20):  # each get drains the connection: both channels take turns
            message = tasks.get(timeout=2)
            assert message.payload == n
            message.ack()
    polls = [q["sql"] for q in queries.captured_queries  # claims: SELECT, or UPDATE on PostgreSQL
             if "queuemessage" in q["sql"] and pidbox in q["sql"]]
    assert 1 <= len(polls) <= 2, polls  # not ten: once per polling interval


NODE_PROCESS = textwrap.dedent("""
    import json, os, sys
    import django
    from django.conf import settings

    settings.configure(DATABASES={"default": json.loads(os.environ["DTQ_TEST_DB"])},
                       INSTALLED_APPS=["django_tasks_q"], USE_TZ=True)
    django.setup()
    from kombu import Connection
    from kombu.pidbox import Mailbox
    from django_tasks_q.transport.django import register

    register()
    hostname = sys.argv[1]
    # As broker.mailbox() declares it, with a short x-expires so the test need not wait long.
    box = Mailbox("celery", type="fanout", accept=["json"], serializer="json", queue_ttl=300.0,
                  reply_queue_ttl=300.0, queue_expires=1.0, reply_queue_expires=1.0)
    with Connection("django://", transport_options={"polling_interval": 0.02}) as conn:
        node = box(conn).Node(hostname, channel=conn.channel(),
                              handlers={"ping": lambda state: {"ok": "pong", "pid": os.getpid()}})
        node.listen()
        print("listening", flush=True)
        while True:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
""")


@pytest.mark.broker
def test_worker_in_another_os_process_answers_and_its_queue_expires_when_killed(
        process: Process, name: str, tmp_path: Path) -> None:
    database = {key: connection.settings_dict[key]
                for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")}
    env = {**os.environ, "DTQ_TEST_DB": json.dumps(database)}
    hostname = f"os@{name}"
    node = subprocess.Popen([sys.executable, "-c", NODE_PROCESS, hostname], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        assert node.stdout.readline().strip() == "listening"
        replies = broker.mailbox(process())._broadcast("ping", reply=True, timeout=2)
        assert replies == [{hostname: {"ok": "pong", "pid": node.pid}}]
    finally:
        node.send_signal(signal.SIGKILL)  # dies without deleting its queue
        node.wait(10)
    queue = f"{hostname}.celery.pidbox"
    assert bindings_of(queue)
    box = broker.mailbox(process())
    box._broadcast("ping")  # nobody reads it any more
    assert QueueMessage.objects.filter(queue=queue).count() == 1
    time.sleep(1.2)  # past its x-expires
    box._broadcast("ping")  # routes nowhere now
    process().default_channel.keep_queues_alive()  # any process's first poll sweeps
    assert not bindings_of(queue)
    assert not QueueMessage.objects.filter(queue=queue).exists()
