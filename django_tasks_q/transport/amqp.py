"""RabbitMQ: task messages as py-amqp content, published and received with less work.

Content carries its properties (a Celery message: about twenty headers) encoded and decoded by
``amqp_props``, to the same bytes and values as py-amqp's.

``publish`` writes a ``basic.publish``, the bytes py-amqp's ``basic_publish`` writes, built in
one piece: without what py-amqp does first on every message (try to read whatever RabbitMQ has
sent: a socket switched to non-blocking and back, an exception caught), and without its frame
writer's general path. The publisher reads its confirms when it waits for them.

``Transport`` is kombu's py-amqp transport reading ahead: py-amqp reads each frame in three
``recv`` calls (header, payload, frame end), and a delivery is three frames; and kombu's event
loop asks for one message at a time with a zero timeout, which py-amqp applies by switching the
socket to non-blocking and back around every read. Here the event loop's reader takes whatever
has arrived, up to ``READ_SIZE``, in one non-blocking ``recv`` (the socket's mode left alone),
and handles every frame cut from it. A wait for a reply reads to the end of its frame and no
further, as py-amqp does.
"""

from __future__ import annotations

import errno
import socket
from struct import Struct
from typing import Any

from amqp import Message, spec
from amqp import transport as amqp_transport
from amqp.exceptions import RecoverableConnectionError, UnexpectedFrame
from amqp.serialization import dumps
from kombu.exceptions import MessageStateError
from kombu.transport import pyamqp

from . import amqp_props

#: The methods followed by content (a header frame, then body frames).
_CONTENT_METHODS = frozenset((spec.Basic.Deliver, spec.Basic.GetOk, spec.Basic.Return))
_METHOD = Struct(">HH")
#: A frame's type, channel and payload size; the payload and the frame-end octet follow.
_FRAME_HEADER = Struct(">BHI")
FRAME_END = 0xCE
#: How much one read of the socket takes at most.
READ_SIZE = 65536
#: A read failing with these leaves the connection up (as py-amqp has it).
_UNAVAILABLE = frozenset((errno.EAGAIN, errno.EINTR, errno.ENOENT))

#: A content header's class (basic), weight and body size; the properties follow.
_CONTENT_HEADER = Struct(">HHQ")
_END = bytes((FRAME_END,))
#: A ``basic.ack`` or ``basic.nack`` frame: type 1 (method), channel, payload size 13, class 60
#: (basic), method 80 (ack) or 120 (nack), delivery tag, flags (bit 0: multiple); frame end.
ACK_FRAME = Struct(">BHIHHQBB")
#: Encoded ``basic.publish`` methods to the default exchange, by queue (as bounded as keys).
_routes: dict[str, bytes] = {}


class Delivered(Message):  # type: ignore[misc]
    """A message received; its properties are decoded by ``amqp_props`` (the same values)."""

    def _load_properties(self, class_id: int, buf: bytes, offset: int) -> int:
        self.properties = amqp_props.decode(buf, offset)
        return offset  # as py-amqp's (the content header ends with the properties)


def frame_handler(connection: Any, callback: Any) -> Any:
    """py-amqp's ``frame_handler``, assembling deliveries as ``Delivered``: a method frame, then
    for content-bearing methods a header frame and body frames, checked in that order on each
    channel."""
    expected: dict[int, int] = {}
    partial: dict[int, Delivered] = {}

    def on_frame(frame: tuple[int, int, bytes]) -> bool:
        kind, channel, buf = frame
        connection.bytes_recv += 1
        if kind == 8:  # heartbeat: counted above
            return False
        wanted = expected.get(channel, 1)
        if kind != wanted:
            raise UnexpectedFrame(f"Received frame {kind} while expecting type: {wanted}")
        if kind == 1:
            method = _METHOD.unpack_from(buf)
            if method in _CONTENT_METHODS:
                partial[channel] = Delivered(frame_method=method, frame_args=buf)
                expected[channel] = 2
                return False
            callback(channel, method, buf, None)
            return True
        msg = partial[channel]
        if kind == 2:
            msg.inbound_header(buf)
        else:
            msg.inbound_body(buf)
        if not msg.ready:
            expected[channel] = 3
            return False
        del expected[channel], partial[channel]
        callback(channel, msg.frame_method, msg.frame_args, msg)
        return True

    return on_frame


def publish(channel: Any, queue: str, body: bytes, properties: dict[str, Any]) -> None:
    """Write ``body`` with ``properties`` (py-amqp's names) to ``queue`` through the default
    exchange on py-amqp ``channel``: a method frame, a content header frame, and the body in
    frames of at most the connection's ``frame_max``, in one write."""
    conn = channel.connection
    if conn is None:
        raise RecoverableConnectionError("basic_publish: connection closed")
    method = _routes.get(queue)
    if method is None:
        # basic.publish: reserved, exchange, routing key, mandatory, immediate
        method = _METHOD.pack(*spec.Basic.Publish) + dumps("Bssbb", (0, "", queue, False, False))
        if len(_routes) < amqp_props.KEYS_CACHED:
            _routes[queue] = method
    cid, chunk = channel.channel_id, conn.frame_max - 8
    header = _CONTENT_HEADER.pack(60, 0, len(body)) + amqp_props.encode(properties)
    payloads = [(1, method), (2, header),
                *((3, body[start:start + chunk]) for start in range(0, len(body), chunk))]
    try:
        conn.transport.write(b"".join([
            part for kind, payload in payloads
            for part in (_FRAME_HEADER.pack(kind, cid, len(payload)), payload, _END)]))
    except (TimeoutError, StopIteration):
        # As py-amqp: a write timeout means the socket is dead, for kombu's ensure() to
        # reconnect.
        raise RecoverableConnectionError("basic_publish: timed out") from None
    conn.bytes_sent += 1  # as py-amqp counts, for heartbeats


def ack(message: Any, multiple: bool = False) -> None:
    """Acknowledge kombu's py-amqp ``message`` (``multiple``: every message before it on its
    channel too), as ``message.ack()`` does, writing the ``basic.ack`` frame itself: py-amqp
    builds that through several layers, a promise and a shared buffer."""
    channel = message.channel
    conn = channel.connection
    if conn is None:
        raise RecoverableConnectionError("basic_ack: connection closed")
    if message.acknowledged:
        raise MessageStateError(f"Message already acknowledged with state: {message._state}")
    conn.transport.write(ACK_FRAME.pack(1, channel.channel_id, 13, 60, 80, message.delivery_tag,
                                        multiple, FRAME_END))
    conn.bytes_sent += 1  # as py-amqp counts, for heartbeats
    message._state = "ACK"


def receive(transport: Any, recv: Any, *args: int) -> None:
    """Add what ``recv(*args)``, a read of py-amqp ``transport``'s socket, returns to its read
    buffer; a closed socket, or a failed read, leaves the transport disconnected."""
    try:
        data = recv(*args)
    except (BlockingIOError, TimeoutError):
        raise  # nothing yet: the connection is fine
    except OSError as exc:
        if exc.errno not in _UNAVAILABLE:
            transport.connected = False
        raise
    if not data:
        transport.connected = False
        raise OSError("Server unexpectedly closed connection")
    transport._read_buffer += data


class ReadAheadTCP(amqp_transport.TCPTransport):  # type: ignore[misc]
    """py-amqp's TCP transport, for an event loop to read what has arrived at once.

    Only ``read_ahead`` takes more than the frame asked for: a read of py-amqp's own (waiting
    for a reply, with a timeout) stops at the end of its frame, as py-amqp's does, so that
    nothing is left in the buffer that the event loop, which watches the socket, would not know
    of."""

    def _setup_transport(self) -> None:
        super()._setup_transport()
        # Frames are cut from the front: a bytearray drops its head without copying the rest.
        self._read_buffer = bytearray()

    def take(self) -> tuple[int, int, bytes] | None:
        """The whole frame at the head of the buffer, ``(type, channel, payload)``, if any."""
        buf = self._read_buffer
        if len(buf) < 8:
            return None
        kind, channel, size = _FRAME_HEADER.unpack_from(buf)
        end = 7 + size
        if len(buf) <= end:
            return None
        if buf[end] != FRAME_END:
            raise UnexpectedFrame(f"Received frame_end {buf[end]:#04x} while expecting 0xce")
        payload = bytes(buf[7:end])
        del buf[:end + 1]
        return kind, channel, payload

    def read_frame(self, unpack: Any = None) -> tuple[int, int, bytes]:
        """The next frame, read up to its end and no further (the socket's timeout applies:
        ``having_timeout``)."""
        while True:
            frame = self.take()
            if frame is not None:
                return frame
            buf = self._read_buffer
            need = 8 if len(buf) < 8 else 8 + _FRAME_HEADER.unpack_from(buf)[2]
            receive(self, self.sock.recv, need - len(buf))

    def read_ahead(self) -> bool:
        """Add what has arrived, up to ``READ_SIZE``, to the buffer without waiting; whether
        there was anything."""
        sock = self.sock
        try:
            if sock.gettimeout() is None:  # blocking: one call, the socket's mode left alone
                receive(self, sock.recv, READ_SIZE, socket.MSG_DONTWAIT)
            else:
                with self.having_timeout(0):
                    receive(self, sock.recv, READ_SIZE)
        except (BlockingIOError, TimeoutError):
            return False
        return True

class _Connection(pyamqp.Connection):
    """kombu's py-amqp connection on ``ReadAheadTCP`` (TLS stays on py-amqp's own), its
    deliveries ``Delivered``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frame_handler_cls = frame_handler

    def Transport(self, host: str, connect_timeout: float | None, ssl: Any = False,  # noqa: N802
                  read_timeout: float | None = None, write_timeout: float | None = None,
                  socket_settings: Any = None, **kwargs: Any) -> Any:
        cls = amqp_transport.SSLTransport if ssl else ReadAheadTCP
        return cls(host, connect_timeout=connect_timeout, ssl=ssl, read_timeout=read_timeout,
                   write_timeout=write_timeout, socket_settings=socket_settings, **kwargs)

    def blocking_read(self, timeout: float | None = None) -> Any:
        frame = self.transport.take() if isinstance(self.transport, ReadAheadTCP) else None
        if frame is None:  # py-amqp's way: the socket's timeout set around the read
            with self.transport.having_timeout(timeout):
                frame = self.transport.read_frame()
        return self.on_inbound_frame(frame)


class Transport(pyamqp.Transport):
    """kombu's py-amqp transport (``amqp://``), reading ahead in the event loop."""

    Connection = _Connection

    def _make_reader(self, connection: Any, *args: Any, **kwargs: Any) -> Any:
        transport = connection.transport
        if not isinstance(transport, ReadAheadTCP):  # TLS
            return super()._make_reader(connection, *args, **kwargs)  # type: ignore[no-untyped-call]

        def read(loop: Any) -> None:
            # kombu's reader handles one message per turn of the loop and then polls again;
            # what was read ahead is not on the socket any more, so all of it is handled here
            # (the prefetch window bounds how much that is).
            if not connection.connected:
                raise RecoverableConnectionError("Socket was disconnected")
            on_frame = connection.on_inbound_frame
            while True:
                frame = transport.take()
                while frame is not None:
                    on_frame(frame)
                    frame = transport.take()
                if not transport.read_ahead():
                    return

        return read
