"""RabbitMQ publisher confirms, collected asynchronously on one channel.

A publisher that waits for each message's confirm makes a round trip per message. Here a
channel in confirm mode numbers what it publishes (1, 2, ... as RabbitMQ does) and keeps each
message until RabbitMQ acknowledges it (one ``basic.ack`` may cover many); ``wait()`` reads
confirms until none (or no more than a given number) is outstanding. What is outstanding when
the connection fails is what the publisher sends again on the next one.

RabbitMQ sends a confirm as a frame of its own, often one per message, and py-amqp reads a
frame in three reads of the socket and several calls. ``wait()`` reads what has arrived in one
piece into py-amqp's read buffer and settles the ``basic.ack``/``basic.nack`` frames at its
head itself; any other frame (a heartbeat, ``connection.blocked``, an error) is py-amqp's to
read, as before.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

# A confirm is a basic.ack (or basic.nack) frame from RabbitMQ.
from .transport.amqp import ACK_FRAME, FRAME_END, READ_SIZE, receive

T = TypeVar("T")

_ACK, _NACK = 80, 120


class ConfirmTimeout(Exception):
    """RabbitMQ confirmed nothing for longer than the wait allows."""


class Confirms(Generic[T]):
    """The messages published on ``channel`` that RabbitMQ has not confirmed yet."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._unconfirmed: dict[int, T] = {}
        self._refused: list[T] = []
        self._tag = 0
        channel.confirm_select()
        channel.events["basic_ack"].add(self._settle)
        channel.events["basic_nack"].add(self._nacked)

    def __len__(self) -> int:
        return len(self._unconfirmed)

    def sent(self, item: T) -> None:
        """``item`` was just published on the channel."""
        self._tag += 1
        self._unconfirmed[self._tag] = item

    def outstanding(self) -> list[T]:
        """What was published and not confirmed, oldest first (to send again elsewhere)."""
        return list(self._unconfirmed.values())

    def wait(self, timeout: float, left: int = 0) -> list[T]:
        """Read confirms until at most ``left`` messages are outstanding; return (and forget)
        what RabbitMQ refused. ``ConfirmTimeout`` when ``timeout`` seconds pass with nothing
        from RabbitMQ."""
        conn = self.channel.connection
        transport = conn.transport
        while len(self._unconfirmed) > left:
            try:
                if not self._settle_buffered(transport):
                    if transport._read_buffer:  # another frame, or part of one: py-amqp's
                        conn.drain_events(timeout=timeout)
                    else:
                        with transport.having_timeout(timeout):
                            receive(transport, transport._quick_recv, READ_SIZE)
            except TimeoutError:
                raise ConfirmTimeout(
                    f"RabbitMQ confirmed none of {len(self._unconfirmed)} messages within "
                    f"{timeout:g}s (a memory or disk alarm blocks publishers)") from None
        refused, self._refused = self._refused, []
        return refused

    def _settle_buffered(self, transport: Any) -> bool:
        """Settle the confirm frames at the head of ``transport``'s read buffer; whether there
        were any."""
        buf = transport._read_buffer
        end, pos, channel_id = len(buf), 0, self.channel.channel_id
        while end - pos >= ACK_FRAME.size:
            kind, channel, size, cls, method, tag, bits, frame_end = ACK_FRAME.unpack_from(buf, pos)
            if (kind, channel, size, cls, frame_end) != (1, channel_id, 13, 60, FRAME_END) or (
                    method != _ACK and method != _NACK):
                break
            pos += ACK_FRAME.size
            if method == _ACK:
                self._settle(tag, bool(bits & 1))
            else:
                self._nacked(tag, bool(bits & 1))
        if pos:
            transport._read_buffer = buf[pos:]
        return pos > 0

    def _settle(self, tag: int, multiple: bool) -> list[T]:
        """Forget what a confirm covers (``basic.ack`` calls this directly); return it."""
        if not multiple:
            item = self._unconfirmed.pop(tag, None)
            return [] if item is None else [item]
        done = []
        for t in list(self._unconfirmed):  # oldest first: stop at the first one after ``tag``
            if t > tag:
                break
            done.append(self._unconfirmed.pop(t))
        return done

    def _nacked(self, delivery_tag: int, multiple: bool) -> None:
        self._refused.extend(self._settle(delivery_tag, multiple))
