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
