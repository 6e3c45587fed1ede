"""Confirms read from py-amqp's buffer: confirm frames at its head are settled here, anything
else is left for py-amqp to read, and a closed socket is a connection error."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from struct import pack, unpack
from typing import Any

import pytest

from django_tasks_q.confirms import Confirms

HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


def confirm(tag: int, multiple: bool = False, nack: bool = False, channel: int = 1) -> bytes:
    return pack(">BHIHHQBB", 1, channel, 13, 60, 120 if nack else 80, tag, int(multiple), 0xCE)


class _Transport:
    """The parts of py-amqp's transport that confirms use: the read buffer, one socket read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self._read_buffer = b""
        self.connected = True
        self.recvs = 0

    def _quick_recv(self, size: int) -> bytes:
        self.recvs += 1
        return self.chunks.pop(0)

    @contextlib.contextmanager
    def having_timeout(self, timeout: float) -> Iterator[None]:
        yield


class _Channel:
    """A channel whose connection reads one frame as py-amqp does, dispatching confirms."""

    channel_id = 1

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport
        self.connection = self
        self.events: defaultdict[str, set[Any]] = defaultdict(set)
        self.frames_py_amqp_read: list[int] = []

    def confirm_select(self) -> None:
        pass

    def drain_events(self, timeout: float) -> None:
        tr = self.transport
        while len(tr._read_buffer) < 7 or len(tr._read_buffer) < 8 + unpack(
                ">I", tr._read_buffer[3:7])[0]:
            tr._read_buffer += tr._quick_recv(65536)
        size = unpack(">I", tr._read_buffer[3:7])[0]
        frame, tr._read_buffer = tr._read_buffer[:size + 8], tr._read_buffer[size + 8:]
        self.frames_py_amqp_read.append(frame[0])
        if frame[0] == 1 and unpack(">H", frame[1:3])[0] == self.channel_id:
            _, _, _, _, method, tag, bits, _ = unpack(">BHIHHQBB", frame)
            for handler in self.events["basic_ack" if method == 80 else "basic_nack"]:
                handler(tag, bool(bits & 1))


def _confirms(chunks: list[bytes], sent: int) -> tuple[Confirms[int], _Channel]:
    channel = _Channel(_Transport(chunks))
    confirms: Confirms[int] = Confirms(channel)
    for item in range(1, sent + 1):
        confirms.sent(item)
    return confirms, channel


def test_confirm_frames_are_settled_from_one_read_and_other_frames_left_to_py_amqp() -> None:
    last = confirm(6)
    confirms, channel = _confirms([
        confirm(1) + confirm(3, multiple=True) + HEARTBEAT + confirm(4, nack=True)
        + confirm(5) + last[:10],
        last[10:],
    ], sent=6)
    assert confirms.wait(5) == [4]  # the refused one
    assert len(confirms) == 0
    # py-amqp read the heartbeat, and the confirm that arrived in two pieces; nothing else.
    assert channel.frames_py_amqp_read == [8, 1]
    assert channel.transport._read_buffer == b""


def test_a_wait_stops_once_no_more_than_left_are_unconfirmed() -> None:
    confirms, channel = _confirms([confirm(2, multiple=True) + confirm(3), confirm(4)], sent=4)
    assert confirms.wait(5, left=2) == []
    assert confirms.outstanding() == [4]  # what arrived in the read is settled, no more read
    assert channel.transport.recvs == 1


def test_a_confirm_for_another_channel_is_left_to_py_amqp() -> None:
    confirms, channel = _confirms([confirm(1, channel=2) + confirm(1)], sent=1)
    confirms.wait(5)
    assert channel.frames_py_amqp_read == [1] and len(confirms) == 0


def test_a_socket_closed_by_rabbitmq_is_a_connection_error() -> None:
    confirms, channel = _confirms([confirm(1), b""], sent=2)
    with pytest.raises(OSError, match="closed connection"):
        confirms.wait(5)
    assert confirms.outstanding() == [2] and not channel.transport.connected
