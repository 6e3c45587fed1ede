"""Our Redis transport: a message leaves its queue and is recorded as unacked in one step."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Consumer
from kombu.utils.json import loads

from django_tasks_q import broker, message
from django_tasks_q.transport import redis as redis_transport

pytestmark = pytest.mark.broker


class Killed(BaseException):
    """Stands for the worker dying at the worst moment: the message taken, nothing done yet."""


@pytest.fixture
def redis_client(redis_url: str, settings: Any) -> redis.Redis:
    settings.TASKS_Q = {"BROKER_URL": redis_url, "BROKER_OPTIONS": {}}
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def qname(redis_client: redis.Redis) -> Iterator[str]:
    yield f"atomic-{uuid.uuid4().hex[:8]}"
    broker.publisher().close()


def publish(qname: str, n: int, priority: int | None = None) -> list[str]:
    ids = []
    for _ in range(n):
        msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.multiply", args=[2, 3],
                                  kwargs={}, queue=qname, priority=priority)
        body, headers, props = message.encode(msg)
        broker.publisher().publish(body, headers, props, qname, priority)
        ids.append(msg.id)
    return ids


def consume(conn: Any, qname: str, prefetch: int, on_message: Any = None) -> list[Any]:
    """Consume ``qname`` on a channel of ours; the list the messages received are added to."""
    got: list[Any] = []
    channel = conn.channel()
    assert isinstance(channel, redis_transport.Channel)
    Consumer(channel, [broker.queue(qname)], accept=["json"], prefetch_count=prefetch,
             on_message=on_message or got.append).consume()
    return got


def drain_once(conn: Any) -> None:
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=2)


def drain_until(conn: Any, got: list[Any], count: int) -> None:
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        drain_once(conn)


def waiting(client: redis.Redis, qname: str, prefix: str = "") -> int:
    """Messages ready in ``qname``, over all its priority lists."""
    return sum(client.llen(key) for key in client.keys(f"{prefix}{qname}*"))


def unacked(client: redis.Redis) -> dict[bytes, bytes]:
    return client.hgetall("unacked")


def recorded_soon(client: redis.Redis, message: Any) -> bool:
    """Whether ``message``'s unacked record is in Redis within a second."""
    tag = message.delivery_tag.encode()
    deadline = time.monotonic() + 1
    while tag not in unacked(client) and time.monotonic() < deadline:
        time.sleep(0.005)
    return tag in unacked(client)


def test_a_taken_message_is_unacked_before_anything_else_happens(
        redis_client: redis.Redis, qname: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # kombu's own transport would have popped it and not recorded it yet: lost for good.
    ids = publish(qname, 1)
    with broker.connection() as conn:
        consume(conn, qname, prefetch=1, on_message=lambda m: None)

        def die(*args: Any) -> None:
            raise Killed

        monkeypatch.setattr(conn.transport, "_deliver", die)
        with pytest.raises(Killed):
            drain_once(conn)
    assert waiting(redis_client, qname) == 0
    entries = unacked(redis_client)
    assert len(entries) == 1
    raw, exchange, routing_key = loads(next(iter(entries.values())))
    assert raw["headers"]["id"] == ids[0]
    assert routing_key == qname
    assert redis_client.zcard("unacked_index") == 1

    # A later worker gives it back once its visibility timeout has passed, and runs it.
    monkeypatch.undo()
    with broker.connection(options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible()
        got = consume(conn, qname, prefetch=1)
        drain_once(conn)
        assert [m.headers["id"] for m in got] == ids
        got[0].ack()
    assert unacked(redis_client) == {} and waiting(redis_client, qname) == 0


def test_one_round_trip_takes_up_to_the_free_prefetch_in_priority_order(
        redis_client: redis.Redis, qname: str) -> None:
    low = publish(qname, 4)
    high = publish(qname, 2, priority=9)
    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=3)
        drain_once(conn)
        assert [m.headers["id"] for m in got] == [*high, low[0]]
        assert len(unacked(redis_client)) == 3
        assert waiting(redis_client, qname) == 3
        for m in got:
            m.ack()
        assert unacked(redis_client) == {}
        # Credit is back: the rest arrive, still recorded before they are handed over.
        got.clear()
        drain_once(conn)
        assert [m.headers["id"] for m in got] == low[1:]
        assert len(unacked(redis_client)) == 3


def test_a_rejected_message_comes_back_once_and_an_acked_one_is_gone(
        redis_client: redis.Redis, qname: str) -> None:
    ids = publish(qname, 2)
    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=1)
        drain_once(conn)
        rejected = got[0].headers["id"]
        got[0].reject(requeue=True)
        assert unacked(redis_client) == {} and waiting(redis_client, qname) == 2
        seen = []
        for _ in range(2):
            got.clear()
            drain_once(conn)
            seen.append(got[0].headers["id"])
            got[0].ack()
        assert sorted(seen) == sorted(ids) and rejected in seen
    assert unacked(redis_client) == {} and waiting(redis_client, qname) == 0


def test_the_script_is_loaded_again_after_the_server_forgets_it(
        redis_client: redis.Redis, qname: str) -> None:
    ids = publish(qname, 2)
    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=1)
        drain_once(conn)
        got[0].ack()
        redis_client.script_flush()
        drain_until(conn, got, 2)
        assert [m.headers["id"] for m in got] == ids
        got[1].ack()
    assert unacked(redis_client) == {}


def test_a_waiting_consumer_gets_a_message_published_later(
        redis_client: redis.Redis, qname: str) -> None:
    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=4)
        drain_once(conn)
        assert got == []
        # Published while the channel waits in BRPOP (every queue was empty).
        ids: list[str] = []
        later = threading.Timer(0.3, lambda: ids.extend(publish(qname, 1)))
        later.start()
        drain_until(conn, got, 1)
        later.join()
        assert [m.headers["id"] for m in got] == ids
        # Recorded as unacked by commands sent before it was handed over, without waiting for
        # their replies.
        channel = got[0].channel
        assert channel._ack_replies == 2
        channel.qos.confirm_acks()
        assert len(unacked(redis_client)) == 1
        assert redis_client.zcard("unacked_index") == 1
        got[0].ack()
    assert unacked(redis_client) == {}


def test_a_message_taken_by_brpop_is_recorded_before_its_callback_and_can_be_given_back(
        redis_client: redis.Redis, qname: str) -> None:
    # Its record reaches Redis before the consumer's callback hands the task over, without this
    # process waiting for it: a worker killed once its task has started cannot lose it. A
    # requeue inside the callback (as the worker does with a message it cannot run) finds it.
    # The record is kombu's: the message, its exchange and its routing key.
    seen: list[str] = []
    recorded_in_callback: list[bool] = []
    records: list[Any] = []

    def give_back_first(message: Any) -> None:
        seen.append(message.headers["id"])
        if len(seen) == 1:
            recorded_in_callback.append(recorded_soon(redis_client, message))
            records.append(loads(unacked(redis_client)[message.delivery_tag.encode()]))
            info = message.delivery_info
            assert records == [[message._raw, info["exchange"], info["routing_key"]]]
            message.reject(requeue=True)
        else:
            message.ack()

    with broker.connection() as conn:
        consume(conn, qname, prefetch=4, on_message=give_back_first)
        drain_once(conn)  # every queue empty: the channel now waits in BRPOP
        later = threading.Timer(0.3, lambda: publish(qname, 1))
        later.start()
        drain_until(conn, seen, 2)
        later.join()
        conn.default_channel.qos.confirm_acks()
    assert recorded_in_callback == [True] and len(records) == 1
    assert len(seen) == 2 and seen[0] == seen[1]
    assert unacked(redis_client) == {} and waiting(redis_client, qname) == 0


def test_a_message_taken_by_brpop_whose_record_fails_is_still_delivered(
        redis_client: redis.Redis, qname: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # BRPOP has taken it off its queue: dropping it would lose it, running it loses it only if
    # the worker dies before the task ends.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("Connection reset by peer")

    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=4)
        drain_once(conn)  # every queue empty: the channel now waits in BRPOP
        monkeypatch.setattr(redis_transport.QoS, "_send", refuse)
        later = threading.Timer(0.3, lambda: publish(qname, 1))
        later.start()
        with caplog.at_level("WARNING", logger="django_tasks_q.transport.redis"):
            drain_until(conn, got, 1)
        later.join()
        assert unacked(redis_client) == {}
        monkeypatch.undo()
        got[0].ack()
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"Could not record message {got[0].delivery_tag} as unacknowledged "
                              "(Connection reset by peer): its task runs")
    assert waiting(redis_client, qname) == 0


def test_a_record_after_redis_closed_the_held_connection_goes_on_a_new_one(
        redis_client: redis.Redis, qname: str) -> None:
    # Redis closes a connection idle past its ``timeout`` setting (or one CLIENT KILL names);
    # the first command written to it after that is lost without an error.
    recorded: list[bool] = []

    with broker.connection() as conn:
        channel = conn.channel()
        Consumer(channel, [broker.queue(qname)], accept=["json"], prefetch_count=4,
                 on_message=lambda m: recorded.append(recorded_soon(redis_client, m))).consume()
        for n in (1, 2):
            drain_once(conn)  # every queue empty: the channel now waits in BRPOP
            later = threading.Timer(0.3, lambda: publish(qname, 1))
            later.start()
            drain_until(conn, recorded, n)
            later.join()
            if n == 1:  # the first record opened the connection; Redis now closes it
                held = channel._ack_conn._sock.getsockname()
                redis_client.client_kill(f"{held[0]}:{held[1]}")
                time.sleep(0.1)
    assert recorded == [True, True]


def test_connections_the_channel_holds_and_drops_do_not_use_up_its_pool(
        redis_client: redis.Redis) -> None:
    # Its publishing and acknowledging connections are made again after each error.
    with broker.connection() as conn:
        channel = conn.channel()
        assert isinstance(channel, redis_transport.Channel)
        for _ in range(channel.pool.max_connections + 2):
            channel._ack_conn = channel.own_connection()
            channel._drop_ack_conn()
        with channel.conn_or_acquire() as client:
            assert client.ping() is True


def test_a_global_key_prefix_applies_to_every_key_the_script_touches(
        redis_client: redis.Redis, qname: str, settings: Any) -> None:
    settings.TASKS_Q = {**settings.TASKS_Q, "BROKER_OPTIONS": {"global_keyprefix": "pfx:"}}
    ids = publish(qname, 1)
    assert waiting(redis_client, qname, "pfx:") == 1
    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=1)
        drain_once(conn)
        assert [m.headers["id"] for m in got] == ids
        assert redis_client.hlen("pfx:unacked") == 1
        assert redis_client.zcard("pfx:unacked_index") == 1
        got[0].ack()
    assert redis_client.hlen("pfx:unacked") == 0 and waiting(redis_client, qname, "pfx:") == 0


def _publisher_envelope(redis_client: redis.Redis, key: str) -> dict[str, Any]:
    envelope: dict[str, Any] = loads(redis_client.rpop(key))
    envelope["properties"].pop("delivery_tag")  # unique per message
    return envelope


@pytest.mark.parametrize("priority", [None, 0, 4, 9])
def test_a_published_message_is_kombus_envelope_key_for_key(
        redis_client: redis.Redis, qname: str, redis_url: str, priority: int | None) -> None:
    msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.multiply", args=[2, 3],
                              kwargs={"é": None}, queue=qname)
    body, headers, props = message.encode(msg)
    broker.publisher().publish(body, headers, props, qname, priority)
    ours = redis_client.keys(f"{qname}*")
    assert len(ours) == 1
    with broker.connection() as conn:  # kombu's own producer, on the same transport
        wire = broker.wire_priority(conn, priority)
        conn.Producer().publish(body, exchange="", routing_key=qname, headers=headers,
                                content_type="application/json", content_encoding="utf-8",
                                priority=wire, delivery_mode=2, **props)
    assert redis_client.keys(f"{qname}*") == ours  # the same priority list
    key = ours[0].decode()
    first, second = (_publisher_envelope(redis_client, key) for _ in range(2))
    assert first == second
    # And it reads back as the message that was sent.
    decoded = message.decode(first["headers"], loads(base64.b64decode(first["body"])))
    assert (decoded.id, decoded.args, decoded.kwargs) == (msg.id, [2, 3], {"é": None})


def test_a_publish_after_the_server_dropped_the_connection_lands_once(
        redis_client: redis.Redis, qname: str) -> None:
    publish(qname, 1)
    killed = redis_client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    publish(qname, 2)
    assert waiting(redis_client, qname) == 3


def test_an_error_reply_reaches_the_caller_and_the_next_publish_works(
        redis_client: redis.Redis, qname: str) -> None:
    redis_client.set(qname, "not a list")
    with pytest.raises(broker.EnqueueError, match="WRONGTYPE"):
        publish(qname, 1)
    redis_client.delete(qname)
    publish(qname, 1)
    assert waiting(redis_client, qname) == 1


def test_a_slow_reply_is_waited_for(redis_client: redis.Redis, qname: str) -> None:
    publish(qname, 1)  # connected
    redis_client.client_pause(300)  # every other client's commands wait 0.3 s
    started = time.monotonic()
    publish(qname, 1)
    assert time.monotonic() - started >= 0.25
    assert waiting(redis_client, qname) == 2


def test_only_a_publish_that_follows_another_polls_for_its_reply(
        redis_client: redis.Redis, qname: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spins: list[float] = []
    real = redis_transport.Channel._read_answers

    def spy(channel: Any, sock: Any, left: int, spin: float = 0.0) -> None:
        spins.append(spin)
        real(channel, sock, left, spin)

    monkeypatch.setattr(redis_transport.Channel, "_read_answers", spy)
    publish(qname, 3)  # back to back
    time.sleep(redis_transport.BURST_SECONDS * 5)
    publish(qname, 1)  # on its own: blocks on the socket, leaving the CPU to Redis and workers
    # (A stall of over a millisecond between the first three would make one of them "alone".)
    assert spins[0] == spins[3] == 0.0
    assert redis_transport.SPIN_SECONDS in spins[1:3]
    assert waiting(redis_client, qname) == 4


def publish_later(qname: str, n: int) -> list[str]:
    """Publish as ``.delay()`` does: without waiting for Redis's answers."""
    ids = []
    for _ in range(n):
        msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.multiply", args=[2, 3],
                                  kwargs={}, queue=qname)
        body, headers, props = message.encode(msg)
        broker.publisher().publish(body, headers, props, qname, wait=False)
        ids.append(msg.id)
    return ids


def unanswered() -> int:
    pub = broker.publisher()
    assert pub._producer is not None
    return len(pub._producer.channel.unanswered)


def waiting_ids(redis_client: redis.Redis, qname: str) -> list[str]:
    keys = redis_client.keys(f"{qname}*")
    return sorted(loads(raw)["headers"]["id"]
                  for key in keys for raw in redis_client.lrange(key, 0, -1))


def test_a_publish_that_does_not_wait_leaves_its_answer_to_a_later_flush(
        redis_client: redis.Redis, qname: str) -> None:
    ids = publish_later(qname, 5)
    assert unanswered() == 5  # written, their answers not read yet
    broker.flush()
    assert unanswered() == 0
    assert waiting_ids(redis_client, qname) == sorted(ids)


def test_answers_are_read_once_the_window_is_full(
        redis_client: redis.Redis, qname: str, settings: Any) -> None:
    settings.TASKS_Q = {**settings.TASKS_Q, "BROKER_OPTIONS": {"confirm_window": 8}}
    seen = []
    for _ in range(20):
        publish_later(qname, 1)
        seen.append(unanswered())
    assert max(seen) < 8 and seen[:7] == [1, 2, 3, 4, 5, 6, 7]
    assert seen[7] <= 4  # the eighth read answers down to half the window
    broker.flush()
    assert waiting(redis_client, qname) == 20


def test_a_refused_publish_that_did_not_wait_is_named_by_the_flush(
        redis_client: redis.Redis, qname: str) -> None:
    publish(qname, 1)  # the queue declared
    [key] = redis_client.keys(f"{qname}*")
    redis_client.delete(key)
    redis_client.set(key, "not a list")
    [refused] = publish_later(qname, 1)  # returns: the error is not read yet
    with pytest.raises(broker.EnqueueError, match=rf"Redis refused 1 task message\(s\) "
                                                  rf"\({refused}\).*WRONGTYPE"):
        broker.flush()
    redis_client.delete(key)
    ids = publish_later(qname, 2)
    broker.flush()
    assert waiting_ids(redis_client, qname) == sorted(ids)


def test_publishes_a_lost_connection_had_not_answered_are_pushed_again(
        redis_client: redis.Redis, qname: str) -> None:
    publish(qname, 1)  # connected
    redis_client.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
    try:
        ids = publish_later(qname, 3)  # they wait in Redis, not run
        time.sleep(0.1)
        # Our connection (and with it the three commands) goes away unanswered.
        assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    assert waiting(redis_client, qname) == 1
    broker.flush()  # reads end of file: the three are pushed again on a new connection
    assert unanswered() == 0
    assert len(waiting_ids(redis_client, qname)) == 4
    assert set(ids) <= set(waiting_ids(redis_client, qname))


def test_over_tls_each_push_is_answered_before_the_next_and_a_refusal_names_its_own(
        redis_client: redis.Redis, qname: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    # redis-py reads TLS connections itself: this connection is taken for one.
    monkeypatch.setattr(redis_transport.ssl, "SSLSocket", socket.socket)
    redis_client.set(f"{qname}-bad", "not a list")
    with broker.connection() as conn:
        channel = conn.default_channel
        assert isinstance(channel, redis_transport.Channel)
        pushes = [redis_transport.Pushed(key.encode(), b"{}", task_id)
                  for key, task_id in ((qname, "a"), (f"{qname}-bad", "b"), (qname, "c"))]
        with pytest.raises(redis_transport.Refused) as refused:
            channel.push(pushes, wait=False, window=100)
        assert [task_id for task_id, _ in refused.value.refused] == ["b"]
        assert "WRONGTYPE" in str(refused.value)
        assert [p.task_id for p in channel.unanswered] == ["c"]  # never written: push it again
        channel.push(channel.take_unanswered(), wait=False, window=100)
        assert not channel.unanswered
    assert redis_client.llen(qname) == 2


def test_acks_taken_later_free_the_slot_at_once_and_reach_redis_together(
        redis_client: redis.Redis, qname: str) -> None:
    publish(qname, 3)
    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=2)
        drain_once(conn)
        assert len(got) == 2 and len(unacked(redis_client)) == 2
        qos = got[0].channel.qos
        acked = list(got)
        for m in acked:
            qos.ack_later(m.delivery_tag)
        # Still unacknowledged in Redis (a worker dying now has them delivered again) ...
        assert len(unacked(redis_client)) == 2
        # ... but the prefetch slots are free: the third message arrives.
        got.clear()
        drain_once(conn)
        assert len(got) == 1 and len(unacked(redis_client)) == 3
        qos.send_acks([m.delivery_tag for m in acked])
        qos.confirm_acks()
        assert len(unacked(redis_client)) == 1
        assert redis_client.zcard("unacked_index") == 1
        got[0].ack()
    assert unacked(redis_client) == {}


def test_acks_are_sent_without_waiting_and_their_errors_reach_the_next_call(
        redis_client: redis.Redis, qname: str) -> None:
    publish(qname, 2)
    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=2)
        drain_once(conn)
        qos = got[0].channel.qos
        qos.send_acks(["not-a-tag"])  # connects
        qos.confirm_acks()
        redis_client.client_pause(300)  # Redis answers nobody for 0.3 s
        started = time.monotonic()
        qos.send_acks([got[0].delivery_tag])
        assert time.monotonic() - started < 0.2  # sent, not waited for
        qos.send_acks([got[1].delivery_tag])  # reads the answer to the first one before
        assert time.monotonic() - started >= 0.25
        qos.confirm_acks()
        assert unacked(redis_client) == {}

        redis_client.set("unacked_index", "not a sorted set")
        qos.send_acks(["some-tag"])
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            qos.confirm_acks()
        redis_client.delete("unacked_index")
        qos.send_acks(["some-tag"])  # a new connection: the failed one was dropped
        qos.confirm_acks()


def test_a_fetch_of_less_than_half_the_window_asks_the_consumer_first(
        redis_client: redis.Redis, qname: str) -> None:
    publish(qname, 6)
    asked: list[int] = []
    defer = [True]

    def defer_fetch(free: int) -> bool:
        asked.append(free)
        return defer[0]

    with broker.connection() as conn:
        got = consume(conn, qname, prefetch=4)
        drain_once(conn)
        assert len(got) == 4  # the whole window was free
        channel = got[0].channel
        assert isinstance(channel, redis_transport.Channel)
        channel.defer_fetch = defer_fetch
        got.pop().ack()
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.3)
        # One slot free and the consumer puts the fetch off: nothing is taken.
        assert asked and set(asked) == {1}
        assert len(got) == 3 and waiting(redis_client, qname) == 2
        defer[0] = False
        drain_until(conn, got, 4)
        assert len(got) == 4 and waiting(redis_client, qname) == 1
        asked.clear()
        for m in got[:2]:
            m.ack()
        got.clear()
        drain_until(conn, got, 1)  # half the window is free: fetched without asking
        assert asked == [] and len(got) == 1 and waiting(redis_client, qname) == 0
        for m in got:
            m.ack()
