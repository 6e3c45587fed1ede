"""The faster encoding of a RabbitMQ message's properties writes py-amqp's bytes exactly, and a
publish writes py-amqp's frames."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from struct import pack
from typing import Any

import pytest
from amqp import Channel, Message
from amqp.exceptions import RecoverableConnectionError
from amqp.method_framing import frame_writer
from amqp.serialization import decode_properties_basic

from django_tasks_q import message
from django_tasks_q.transport import amqp as amqp_transport
from django_tasks_q.transport import amqp_props


def _both(**properties: Any) -> tuple[bytes, bytes]:
    """The properties encoded by us and by py-amqp; each also decodes as py-amqp decodes it."""
    ours = amqp_props.encode(properties)
    theirs = Message(b"{}", **properties)._serialize_properties()
    for encoded in {ours, theirs}:
        assert amqp_props.decode(b"xx" + encoded, 2) == decode_properties_basic(encoded, 0)[0]
    return ours, theirs


def test_a_task_messages_properties_encode_to_the_same_bytes() -> None:
    msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.add", args=[1, "é"],
                              kwargs={"k": [None, True]}, queue="q", priority=7)
    _, headers, properties = message.encode(msg)
    ours, theirs = _both(content_type="application/json", content_encoding="utf-8",
                         application_headers=headers, delivery_mode=2, priority=7,
                         **properties)
    assert ours == theirs
    assert len(headers) > 10  # a real Celery header set, not an empty table


@pytest.mark.parametrize("value", [
    "", "ascii", "ünïcode ✓", "\udcff", b"raw bytes", None, True, False, 0, -1,
    2**31 - 1, -(2**31), 2**31, -(2**31) + 1, 2**62, 1.5, Decimal("1.25"),
    datetime(2026, 11, 23, 4, 0, tzinfo=UTC), [1, "a", [None, {"x": 1}]], (1, 2), {},
    {"nested": {"deep": ["x", False]}},
], ids=repr)
def test_each_header_type_encodes_to_the_same_bytes(value: Any) -> None:
    ours, theirs = _both(application_headers={"h": value, "ключ": value})
    assert ours == theirs


def test_every_property_encodes_to_the_same_bytes() -> None:
    ours, theirs = _both(
        content_type="application/json", content_encoding="utf-8", application_headers={},
        delivery_mode=2, priority=0, correlation_id="c", reply_to="r", expiration="60000",
        message_id="m", timestamp=1700000000, type="t", user_id="guest", app_id="a",
        cluster_id="x")
    assert ours == theirs
    assert _both() == (b"\x00\x00", b"\x00\x00")


def _table(*items: bytes) -> bytes:
    data = b"".join(items)
    return b"\x20\x00" + pack(">I", len(data)) + data  # the headers flag, then the table


@pytest.mark.parametrize("item", [
    b"\x01bs\xff\xfe", b"\x01bb\xfe", b"\x01bB\xfe", b"\x01bU\xff\xfe", b"\x01bu\xff\xfe",
    b"\x01bi\xff\xff\xff\xfe", b"\x01bl" + pack(">q", -5), b"\x01bf" + pack(">f", 0.5),
    b"\x01bd" + pack(">d", 0.25), b"\x01bD\x02" + pack(">i", 125),
    b"\x01bx\x00\x00\x00\x02\xff\x00", b"\x01bT" + pack(">Q", 1700000000),
    b"\x01bS\x00\x00\x00\x02\xff\xfe",  # not UTF-8: bytes, as py-amqp reads it
    b"\x02\xff\xfeS\x00\x00\x00\x01v",  # a key not UTF-8 either
    b"\x01bA\x00\x00\x00\x0bs\x00\x01l" + pack(">q", -1),  # an array of them
], ids=repr)
def test_header_types_others_send_decode_as_py_amqp_decodes_them(item: bytes) -> None:
    ours = amqp_props.decode(_table(item), 0)
    assert ours == decode_properties_basic(_table(item), 0)[0]
    assert len(ours["application_headers"]) == 1


def test_header_names_are_cached_up_to_a_bound() -> None:
    headers = {f"name-{i}": i for i in range(amqp_props.KEYS_CACHED + 10)}
    ours, theirs = _both(application_headers=headers)
    assert ours == theirs
    assert len(amqp_props._keys) <= amqp_props.KEYS_CACHED


def test_a_header_encodes_its_new_value_when_one_message_after_another_changes_it() -> None:
    tags = ["a"]
    sequence = [
        {"task": "t", "retries": 1, "tags": tags, "seen": None},
        {"task": "t", "retries": True, "tags": tags, "seen": "x"},  # True == 1, written as 't'
        {"task": "u", "retries": 1, "tags": tags, "seen": None},
    ]
    for headers in sequence * 2:
        tags.append("b")  # the same list, changed in place: encoded as it is now
        ours, theirs = _both(application_headers=headers)
        assert ours == theirs
    assert len(amqp_props._last) <= amqp_props.KEYS_CACHED


class _Connection:
    """What a publish uses of a py-amqp connection: its frame writer (py-amqp's own, on this
    connection) and its transport, which records what is written and what is read."""

    client_properties = {"capabilities": {"connection.blocked": True}}

    def __init__(self, frame_max: int = 131072) -> None:
        self.frame_max, self.bytes_sent = frame_max, 0
        self.written = bytearray()
        self.reads = 0
        self.transport = self
        self.frame_writer = frame_writer(self, self)

    def write(self, data: bytes) -> None:
        self.written += data

    def drain_events(self, timeout: float | None = None) -> None:
        self.reads += 1

    @contextlib.contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[None]:
        yield


def _channel(conn: _Connection | None) -> Channel:
    channel = Channel.__new__(Channel)  # not opened: only what a publish reads is set
    channel.connection, channel.channel_id = conn, 7
    return channel


def _publish_both(queue: str, body: bytes, frame_max: int = 131072,
                  **properties: Any) -> tuple[_Connection, _Connection]:
    """The same message published by py-amqp and by us, each on a connection of its own."""
    theirs, ours = _Connection(frame_max), _Connection(frame_max)
    _channel(theirs).basic_publish(Message(body, **properties), exchange="", routing_key=queue)
    amqp_transport.publish(_channel(ours), queue, body, properties)
    return theirs, ours


def test_a_publish_writes_py_amqps_bytes_without_reading_first() -> None:
    msg = message.TaskMessage(id=message.new_id(), name="tests.tasks.add", args=[1, "é"],
                              kwargs={}, queue="q1", priority=3)
    body, headers, properties = message.encode(msg)
    theirs, ours = _publish_both("q1", body.encode(), content_type="application/json",
                                 content_encoding="utf-8", application_headers=headers,
                                 delivery_mode=2, priority=3, **properties)
    assert ours.written == theirs.written and len(ours.written) > len(body) + 200
    assert (theirs.bytes_sent, ours.bytes_sent) == (1, 1)  # what heartbeats count
    assert (theirs.reads, ours.reads) == (1, 0)  # py-amqp reads before every message
    with pytest.raises(RecoverableConnectionError):
        amqp_transport.publish(_channel(None), "q1", b"{}", {})


@pytest.mark.parametrize("size", [0, 1, 4088, 4089, 10000])
def test_a_body_is_cut_into_frames_as_py_amqp_cuts_it(size: int) -> None:
    # frame_max 4096: at most 4088 octets of body per frame
    theirs, ours = _publish_both("q1", bytes(range(256)) * (size // 256) + b"x" * (size % 256),
                                 frame_max=4096, delivery_mode=2)
    assert ours.written == theirs.written


def test_routes_are_cached_up_to_a_bound() -> None:
    conn = _Connection()
    for i in range(amqp_props.KEYS_CACHED + 10):
        amqp_transport.publish(_channel(conn), f"queue-{i}", b"{}", {})
    assert len(amqp_transport._routes) <= amqp_props.KEYS_CACHED
    theirs, ours = _publish_both(f"queue-{i}", b"{}")  # beyond the bound: encoded each time
    assert ours.written == theirs.written
