"""The embedded ``django://`` transport, driven through kombu as any consumer would drive it."""

from __future__ import annotations

import contextlib
import json
import os
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

import pytest
from django.db import OperationalError, connection, connections, transaction
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport import TRANSPORT_ALIASES

from django_tasks_q.models import QueueMessage
from django_tasks_q.transport.django import Transport, register

pytestmark = pytest.mark.django_db(transaction=True)

ON_POSTGRES = connection.vendor == "postgresql"
ON_SQLITE = connection.vendor == "sqlite"
needs_postgres = pytest.mark.skipif(
    not ON_POSTGRES,
    reason="PostgreSQL only (SKIP LOCKED claims, server-side connection kills): "
    "run with DATABASE_URL=postgres://postgres@127.0.0.1:5432/test")
needs_sqlite = pytest.mark.skipif(not ON_SQLITE, reason="SQLite-only behaviour")

Connect = Callable[..., Connection]


@pytest.fixture(autouse=True)
def _registered() -> None:
    register()


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Open ``django://`` connections (with transport options) closed after the test."""
    opened: list[Connection] = []

    def _connect(**options: Any) -> Connection:
        conn = Connection("django://", transport_options=options)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.release()


@pytest.fixture
def qname() -> str:
    """A queue name no other test uses (bindings are shared by the whole process)."""
    return f"q-{uuid.uuid4().hex[:10]}"


def kombu_queue(name: str) -> Queue:
    """The project's layout: a direct exchange named like the queue, routing key = name."""
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def collect(conn: Connection, name: str, count: int, prefetch: int | None = None,
            timeout: float = 5.0) -> list[Any]:
    """Consume and ack ``count`` messages of ``name`` through a kombu Consumer."""
    bodies: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        bodies.append(body)
        message.ack()

    with Consumer(conn, [kombu_queue(name)], callbacks=[on_message]) as consumer:
        if prefetch:
            consumer.qos(prefetch_count=prefetch)
        deadline = time.monotonic() + timeout
        while len(bodies) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
    return bodies


def test_register_is_idempotent_and_errors_are_kombu_connection_errors() -> None:
    register()
    register()
    assert TRANSPORT_ALIASES["django"] == "django_tasks_q.transport.django:Transport"
    conn = Connection("django://")
    assert conn.transport_cls == "django"
    assert isinstance(conn.transport, Transport)
    assert OperationalError in conn.connection_errors
    assert OperationalError in conn.recoverable_connection_errors


def test_publish_consume_ack(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)
    queue.put({"hello": "world"})
    message = queue.get(timeout=2)
    assert message.payload == {"hello": "world"}
    assert message.delivery_info["redelivered"] is False
    row = QueueMessage.objects.get()
    assert (row.queue, row.deliveries) == (qname, 1)
    assert row.claimed_by
    message.ack()
    assert not QueueMessage.objects.exists()


def test_ack_many_deletes_every_row_in_one_go(connect: Connect, qname: str) -> None:
    conn = connect()
    queue = conn.SimpleQueue(qname)
    for n in range(3):
        queue.put(n)
    queue.put("kept")
    got = [queue.get(timeout=2) for _ in range(3)]
    channel = got[0].channel
    channel.qos.ack_many([m.delivery_tag for m in got])
    assert QueueMessage.objects.count() == 1
    channel.qos._flush()  # kombu forgets acknowledged tags lazily
    assert not channel.qos._delivered.keys() & {m.delivery_tag for m in got}
    last = queue.get(timeout=2)
    assert last.payload == "kept"
    last.ack()
    assert not QueueMessage.objects.exists()


def test_acks_taken_later_keep_their_rows_until_flushed(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)
    for n in range(2):
        queue.put(n)
    got = [queue.get(timeout=2) for _ in range(2)]
    qos = got[0].channel.qos
    for m in got:
        qos.ack_later(m.delivery_tag)
    assert QueueMessage.objects.count() == 2  # a worker dying now has them delivered again
    qos._flush()
    assert not qos._delivered.keys() & {m.delivery_tag for m in got}  # slots free already
    qos.send_acks([m.delivery_tag for m in got])
    assert not QueueMessage.objects.exists()


def test_reject_with_requeue_redelivers_at_once(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)
    queue.put("again")
    first = queue.get(timeout=2)
    first.reject(requeue=True)
    second = queue.get(timeout=1)
    assert second.payload == "again"
    assert second.delivery_info["redelivered"] is True
    second.ack()
    assert not QueueMessage.objects.exists()


def test_reject_without_requeue_drops(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)
    queue.put("gone")
    queue.get(timeout=2).reject()
    assert not QueueMessage.objects.exists()
    with pytest.raises(Empty):
        queue.get_nowait()


@pytest.mark.parametrize("prefetch", [None, 10], ids=["one-at-a-time", "batch-claim"])
def test_higher_priority_first_fifo_within_priority(
        connect: Connect, qname: str, prefetch: int | None) -> None:
    conn = connect()
    producer = Producer(conn)
    sent = [("a", 0), ("b", 9), ("c", 5), ("d", 9), ("e", 0), ("f", 5)]
    for body, priority in sent:
        producer.publish(body, exchange=qname, routing_key=qname, priority=priority,
                         declare=[kombu_queue(qname)])
    assert collect(conn, qname, len(sent), prefetch=prefetch) == ["b", "d", "c", "f", "a", "e"]


def test_one_consumer_over_several_queues_takes_the_highest_priority_first(
        connect: Connect, qname: str) -> None:
    conn = connect()
    names = [f"{qname}-{n}" for n in range(3)]
    producer = Producer(conn)
    sent = [(0, "a0", 0), (1, "b5", 5), (2, "c9", 9), (0, "a9", 9), (1, "b0", 0), (2, "c5", 5)]
    for index, body, priority in sent:
        name = names[index]
        producer.publish(body, exchange=name, routing_key=name, priority=priority,
                         declare=[kombu_queue(name)])
    bodies: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        bodies.append(body)
        message.ack()

    with Consumer(conn, [kombu_queue(name) for name in names], callbacks=[on_message]) as c:
        c.qos(prefetch_count=10)
        while len(bodies) < len(sent):
            conn.drain_events(timeout=2)
    assert bodies == ["c9", "a9", "b5", "c5", "a0", "b0"]


def test_expired_lease_is_delivered_again(connect: Connect, qname: str) -> None:
    dead = connect(visibility_timeout=0.3).SimpleQueue(qname)
    alive = connect().SimpleQueue(qname)
    dead.put("work")
    assert dead.get(timeout=2).payload == "work"  # never acked: its consumer "dies" here
    with pytest.raises(Empty):
        alive.get_nowait()
    time.sleep(0.4)
    again = alive.get(timeout=2)
    assert again.payload == "work"
    assert again.delivery_info["redelivered"] is True
    again.ack()
    assert not QueueMessage.objects.exists()


def test_live_consumer_renews_its_leases(connect: Connect, qname: str) -> None:
    holder_conn = connect(visibility_timeout=0.6)
    holder = holder_conn.SimpleQueue(qname)
    other = connect().SimpleQueue(qname)
    holder.put("long task")
    message = holder.get(timeout=2)
    deadline = time.monotonic() + 1.8  # three lease lengths
    while time.monotonic() < deadline:
        with pytest.raises(TimeoutError):  # the holder keeps polling, which renews
            holder_conn.drain_events(timeout=0.05)
        with pytest.raises(Empty):
            other.get_nowait()
    message.ack()
    assert not QueueMessage.objects.exists()


def test_size_counts_ready_messages_and_purge_removes_them(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)
    for n in range(3):
        queue.put(n)
    assert queue.qsize() == 3
    held = queue.get(timeout=2)
    assert queue.qsize() == 2  # like AMQP, a message in flight is not counted
    assert queue.clear() == 2
    assert queue.qsize() == 0
    held.ack()
    assert not QueueMessage.objects.exists()


def test_queue_delete_removes_all_messages(connect: Connect, qname: str) -> None:
    conn = connect()
    conn.SimpleQueue(qname).put("x")
    other = connect()  # a connection that never declared the queue's bindings
    kombu_queue(qname).bind(other.default_channel).delete()
    assert not QueueMessage.objects.exists()


def test_messages_survive_a_new_connection(qname: str) -> None:
    with Connection("django://") as first:
        first.SimpleQueue(qname).put("kept")
    with Connection("django://") as second:
        queue = second.SimpleQueue(qname)
        message = queue.get(timeout=2)
        assert message.payload == "kept"
        message.ack()
        queue.close()


def test_publishing_joins_the_callers_transaction(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)
    with pytest.raises(RuntimeError), transaction.atomic():
        queue.put("rolled back")
        raise RuntimeError
    assert not QueueMessage.objects.exists()
    with transaction.atomic():
        queue.put("committed")
    message = queue.get(timeout=2)
    assert message.payload == "committed"
    message.ack()


def test_unbound_direct_exchange_named_like_the_key_routes_to_that_queue(
        connect: Connect, qname: str) -> None:
    conn = connect()
    # This process never bound the consumer's queue (another process did): the project's
    # layout (exchange, queue and routing key of one name) still arrives.
    Producer(conn).publish("routed", exchange=Exchange(qname, "direct"), routing_key=qname)
    assert collect(conn, qname, 1) == ["routed"]


@pytest.mark.parametrize("kind", ["direct", "topic"])
def test_other_unrouted_messages_are_dropped(connect: Connect, qname: str, kind: str) -> None:
    exchange = Exchange(f"x-{qname}", kind)
    Producer(connect()).publish("nowhere", exchange=exchange, routing_key=qname,
                                declare=[exchange])
    assert not QueueMessage.objects.exists()


def test_no_ack_consumer_deletes_on_delivery(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname, no_ack=True)
    queue.put("once")
    assert queue.get(timeout=2).payload == "once"
    assert not QueueMessage.objects.exists()


def test_close_gives_back_unacked_and_prefetched_messages(connect: Connect, qname: str) -> None:
    conn = connect()
    for n in range(3):
        conn.SimpleQueue(qname).put(n)
    got: list[Any] = []
    consumer = Consumer(conn, [kombu_queue(qname)], callbacks=[lambda body, m: got.append(m)])
    consumer.consume()
    consumer.qos(prefetch_count=10)
    conn.drain_events(timeout=2)  # claims all three, delivers one
    assert len(got) == 1
    assert QueueMessage.objects.filter(claimed_by="").count() == 0
    consumer.cancel()  # the two claimed but undelivered come back, not counted as delivered
    assert QueueMessage.objects.filter(claimed_by="", deliveries=0).count() == 2
    conn.release()  # and the unacked one comes back as soon as the channel closes
    assert QueueMessage.objects.filter(claimed_by="").count() == 3
    assert collect(connect(), qname, 3) == [0, 1, 2]


@needs_sqlite
def test_sqlite_lock_never_crashes_the_consumer(
        connect: Connect, qname: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = connect()
    queue = conn.SimpleQueue(qname)
    queue.put("later")
    channel = queue.channel
    monkeypatch.setattr("django_tasks_q.transport.django.time.sleep", lambda s: None)
    calls: list[int] = []

    def locked(queues: list[str], limit: int) -> Any:
        calls.append(limit)
        raise OperationalError("database is locked")

    monkeypatch.setattr(channel, "_claim", locked)
    with pytest.raises(Empty):
        queue.get(timeout=0.2)  # polls and gives up quietly, no OperationalError
    assert len(calls) >= 4
    monkeypatch.undo()
    message = queue.get(timeout=2)
    assert message.payload == "later"
    message.ack()


@needs_postgres
@pytest.mark.broker
@pytest.mark.postgres  # runs in the integration pass on PostgreSQL
def test_claims_skip_rows_locked_by_another_consumer(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)
    queue.put("first")
    queue.put("second")
    first_id = QueueMessage.objects.order_by("id").values_list("id", flat=True)[0]
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        try:
            with transaction.atomic():
                QueueMessage.objects.select_for_update().get(id=first_id)
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(5)
        started = time.monotonic()
        message = queue.get(timeout=2)
        assert message.payload == "second"  # skipped the locked row instead of waiting
        assert time.monotonic() - started < 1.5
        message.ack()
    finally:
        release.set()
        holder.join()
    message = queue.get(timeout=2)
    assert message.payload == "first"
    message.ack()


@needs_postgres
@pytest.mark.broker
@pytest.mark.postgres  # runs in the integration pass on PostgreSQL
def test_two_consumer_threads_never_receive_the_same_message(qname: str) -> None:
    total = 300
    with Connection("django://") as conn:
        producer = Producer(conn)
        for n in range(total):
            producer.publish(n, exchange=qname, routing_key=qname, declare=[kombu_queue(qname)])
    results: list[list[Any]] = [[], []]
    barrier = threading.Barrier(2)

    def consume(slot: int) -> None:
        try:
            with Connection("django://", transport_options={"polling_interval": 0.01}) as conn:
                barrier.wait(5)
                results[slot] = collect(conn, qname, total, prefetch=4, timeout=3)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=consume, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received = results[0] + results[1]
    assert sorted(received) == list(range(total)), "a message was lost or delivered twice"
    assert results[0] and results[1], "both consumers should have taken a share"
    assert not QueueMessage.objects.exists()


@needs_postgres
@pytest.mark.broker
@pytest.mark.postgres  # runs in the integration pass on PostgreSQL
def test_recovers_when_the_database_drops_the_connection(connect: Connect, qname: str) -> None:
    queue = connect().SimpleQueue(qname)

    def kill_our_backend() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        admin = connection.get_new_connection(connection.get_connection_params())
        try:
            admin.autocommit = True
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        finally:
            admin.close()
        time.sleep(0.1)

    queue.put("before")
    kill_our_backend()
    message = queue.get(timeout=2)  # the claim meets the dead socket, reconnects, carries on
    assert message.payload == "before"
    message.ack()
    kill_our_backend()
    queue.put("after")  # so does a publish outside a transaction
    message = queue.get(timeout=2)
    assert message.payload == "after"
    message.ack()


CONSUMER_PROCESS = textwrap.dedent("""
    import json, os, sys, time
    import django
    from django.conf import settings

    settings.configure(DATABASES={"default": json.loads(os.environ["DTQ_TEST_DB"])},
                       INSTALLED_APPS=["django_tasks_q"], USE_TZ=True)
    django.setup()
    from kombu import Connection, Consumer, Exchange, Producer, Queue
    from django_tasks_q.transport.django import register

    register()
    mode, name, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    if mode == "publish":
        if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
            from django.db import connection
            from django_tasks_q.models import QueueBinding, QueueMessage
            with connection.schema_editor() as editor:
                editor.create_model(QueueMessage)
                editor.create_model(QueueBinding)
        with Connection("django://") as conn:
            producer = Producer(conn)
            for n in range(int(arg)):
                producer.publish(n, exchange=name, routing_key=name, declare=[queue])
        sys.exit(0)
    received = []
    def on_message(body, message):
        received.append(body)
        time.sleep(0.005)  # a little work, so the two consumers overlap even on a busy machine
        message.ack()
    with Connection("django://", transport_options={"polling_interval": 0.01}) as conn:
        with Consumer(conn, [queue], callbacks=[on_message]) as consumer:
            consumer.qos(prefetch_count=4)
            time.sleep(max(0.0, float(arg) - time.time()))  # start together with the other
            idle_since = time.monotonic()
            while time.monotonic() - idle_since < 1.5:
                try:
                    conn.drain_events(timeout=0.2)
                    idle_since = time.monotonic()
                except TimeoutError:
                    pass
    print(json.dumps(received))
""")


@pytest.mark.broker
def test_two_consumer_processes_never_receive_the_same_message(
        qname: str, tmp_path: Path) -> None:
    if ON_SQLITE:  # processes cannot share an in-memory database: use a file
        database = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "broker.db")}
    else:
        database = {key: connection.settings_dict[key]
                    for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")}
    env = {**os.environ, "DTQ_TEST_DB": json.dumps(database)}
    run = [sys.executable, "-c", CONSUMER_PROCESS]
    total = 400
    subprocess.run([*run, "publish", qname, str(total)], env=env, check=True, timeout=60)
    start_at = str(time.time() + 5)
    consumers = [subprocess.Popen([*run, "consume", qname, start_at], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    shares = []
    for process in consumers:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        shares.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(shares[0] + shares[1]) == list(range(total)), "lost or delivered twice"
    assert shares[0] and shares[1], "both consumers should have taken a share"
