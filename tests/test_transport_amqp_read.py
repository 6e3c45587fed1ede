"""The RabbitMQ transport reads ahead only for the event loop: its reader handles every frame
that arrived in one read, and a read of py-amqp's own (waiting for a reply) stops at the end of
its frame, so that no frame waits in the buffer while the loop polls an empty socket."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from struct import pack
from typing import Any

import pytest
from amqp.exceptions import RecoverableConnectionError, UnexpectedFrame
from kombu import Connection

from django_tasks_q.transport import amqp as amqp_transport
from django_tasks_q.transport import amqp_props
from django_tasks_q.transport.amqp import ReadAheadTCP


def frame(kind: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return pack(">BHI", kind, channel, len(payload)) + payload + bytes((end,))


@pytest.fixture
def pair() -> Iterator[tuple[ReadAheadTCP, socket.socket]]:
    ours, broker = socket.socketpair()
    transport = ReadAheadTCP.__new__(ReadAheadTCP)  # connected already: the socket is given
    transport.sock, transport.connected = ours, True
    transport._setup_transport()
    yield transport, broker
    ours.close()
    broker.close()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_read_of_py_amqps_own_stops_at_the_end_of_its_frame(
        pair: tuple[ReadAheadTCP, socket.socket]) -> None:
    transport, broker = pair
    broker.sendall(frame(1, 1, b"reply") + frame(3, 1, b"x" * 300) + frame(8, 0, b""))
    assert transport.read_frame() == (1, 1, b"reply")
    assert transport._read_buffer == b""
    assert _readable(transport.sock)  # the rest is the event loop's to see
    assert transport.read_frame() == (3, 1, b"x" * 300)
    assert transport.read_frame() == (8, 0, b"")
    assert not _readable(transport.sock)


def test_read_ahead_takes_what_has_arrived_and_frames_are_cut_from_it(
        pair: tuple[ReadAheadTCP, socket.socket]) -> None:
    transport, broker = pair
    assert transport.read_ahead() is False  # nothing yet: no wait
    sent = [frame(1, 2, b"m"), frame(2, 2, b"header" * 50), frame(3, 2, b"body")]
    data = b"".join(sent)
    broker.sendall(data[:-3])  # the last frame arrives in two parts
    assert transport.read_ahead() is True
    assert not _readable(transport.sock)
    assert transport.take() == (1, 2, b"m")
    assert transport.take() == (2, 2, b"header" * 50)
    assert transport.take() is None
    broker.sendall(data[-3:])
    assert transport.read_ahead() is True
    taken = transport.take()
    assert taken == (3, 2, b"body") and type(taken[2]) is bytes
    assert transport._read_buffer == b""


def test_a_frame_with_a_wrong_end_octet_is_an_error(
        pair: tuple[ReadAheadTCP, socket.socket]) -> None:
    transport, broker = pair
    broker.sendall(frame(1, 1, b"abc", end=0x00))
    assert transport.read_ahead()
    with pytest.raises(UnexpectedFrame, match="0x00"):
        transport.take()


def test_a_closed_socket_is_a_connection_error(
        pair: tuple[ReadAheadTCP, socket.socket]) -> None:
    transport, broker = pair
    broker.sendall(frame(1, 1, b"last"))
    broker.close()
    assert transport.read_ahead()
    assert transport.take() == (1, 1, b"last")
    with pytest.raises(OSError, match="closed"):
        transport.read_ahead()
    assert transport.connected is False


class _Connection:
    """What kombu's reader uses of a py-amqp connection."""

    def __init__(self, transport: ReadAheadTCP) -> None:
        self.transport, self.connected, self.frames = transport, True, []

    def on_inbound_frame(self, frame: tuple[int, int, bytes]) -> None:
        self.frames.append(frame)


def test_the_event_loops_reader_handles_every_frame_arrived_and_what_was_left_before(
        pair: tuple[ReadAheadTCP, socket.socket]) -> None:
    transport, broker = pair
    conn = _Connection(transport)
    read = amqp_transport.Transport(Connection("amqp://"))._make_reader(conn)
    broker.sendall(frame(1, 1, b"left by a reply"))
    transport.read_ahead()  # as if a wait for a reply had read it
    broker.sendall(b"".join(frame(3, 1, b"%d" % i) for i in range(500)))
    read(None)
    assert conn.frames == [(1, 1, b"left by a reply")] + [(3, 1, b"%d" % i) for i in range(500)]
    assert not _readable(transport.sock) and transport._read_buffer == b""
    read(None)  # woken with nothing to read: returns without waiting
    assert len(conn.frames) == 501
    conn.connected = False
    with pytest.raises(RecoverableConnectionError):
        read(None)


def test_amqp_urls_use_the_read_ahead_transport_and_amqps_keeps_kombus(settings: Any) -> None:
    from django_tasks_q import broker

    conn = broker.connection("amqp://guest:guest@127.0.0.1:5672//")
    assert conn.transport_cls is amqp_transport.Transport
    assert broker.connection("amqps://guest:guest@127.0.0.1:5671//").transport_cls == "amqps"


class _Counting:
    bytes_recv = 0


def _delivery(channel: int, tag: int, body: bytes,
              parts: int = 1) -> list[tuple[int, int, bytes]]:
    """A ``basic.deliver`` as RabbitMQ frames it: method, content header, body frames."""
    method = pack(">HH", 60, 60) + b"\x03ctg" + pack(">Q", tag) + b"\x00\x00\x01q"
    header = pack(">HHQ", 60, 0, len(body)) + amqp_props.encode(
        {"content_type": "application/json", "application_headers": {"id": f"t{tag}"}})
    size = max(1, -(-len(body) // parts))  # no body frame for an empty body
    return [(1, channel, method), (2, channel, header),
            *[(3, channel, body[i:i + size]) for i in range(0, len(body), size)]]


def test_deliveries_are_assembled_from_their_frames_on_each_channel() -> None:
    got: list[tuple[int, tuple[int, int], Any]] = []
    counting = _Counting()
    on_frame = amqp_transport.frame_handler(counting, lambda ch, m, args, msg: got.append(
        (ch, m, msg)))
    one, two = _delivery(1, 1, b'{"a": 1}', parts=3), _delivery(2, 7, b"")
    # Channels interleave; a heartbeat may come between any two frames.
    for frame in [one[0], two[0], one[1], (8, 0, b""), two[1], *one[2:]]:
        on_frame(frame)
    assert [(ch, m) for ch, m, _ in got] == [(2, (60, 60)), (1, (60, 60))]
    empty, full = got[0][2], got[1][2]
    assert isinstance(full, amqp_transport.Delivered)
    assert full.body == b'{"a": 1}' and empty.body == ""  # py-amqp's, when there is none
    assert full.properties == {"content_type": "application/json",
                               "application_headers": {"id": "t1"}}
    assert counting.bytes_recv == 8  # every frame, the heartbeat too
    on_frame((1, 1, pack(">HH", 60, 11)))  # basic.qos-ok: no content
    assert got[-1][1:] == ((60, 11), None)


def test_a_frame_out_of_order_is_an_error() -> None:
    on_frame = amqp_transport.frame_handler(_Counting(), lambda *args: None)
    method, _, body = _delivery(1, 1, b"x")
    on_frame(method)
    with pytest.raises(UnexpectedFrame, match="Received frame 3 while expecting type: 2"):
        on_frame(body)
    with pytest.raises(UnexpectedFrame, match="Received frame 2 while expecting type: 1"):
        on_frame((2, 5, b""))
