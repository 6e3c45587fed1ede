"""Processes: what comes through a pipe between the worker and a pool child, read in pieces.

Each end writes with ``multiprocessing.connection.Connection.send_bytes``: a length, then the
bytes (a pickle). Its ``recv_bytes`` reads the length and the bytes in two reads of the pipe,
one message at a time; ``Frames`` reads whatever has arrived in one, and cuts messages from
that, so an outcome, or a task queued behind another, costs one read or none.
"""

from __future__ import annotations

import os
from struct import Struct

#: multiprocessing's length prefix; -1 means an 8-byte length follows (2 GiB and more).
_LENGTH = Struct("!i")
_LONG_LENGTH = Struct("!Q")
#: How much one read of the pipe takes at most.
READ_SIZE = 65536


class Frames:
    """The messages arriving on pipe end ``fd`` (a ``Connection``'s file descriptor)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def read(self) -> bool:
        """Add what has arrived (waiting for something if nothing has); False at end of file.
        ``OSError`` as ``os.read`` raises it."""
        data = os.read(self.fd, READ_SIZE)
        self._buffer += data
        return bool(data)

    def take(self) -> bytes | None:
        """The next whole message read, or None."""
        buf = self._buffer
        if len(buf) < _LENGTH.size:
            return None
        size, start = _LENGTH.unpack_from(buf)[0], _LENGTH.size
        if size == -1:
            if len(buf) < start + _LONG_LENGTH.size:
                return None
            size, start = _LONG_LENGTH.unpack_from(buf, start)[0], start + _LONG_LENGTH.size
        end = start + size
        if len(buf) < end:
            return None
        message = bytes(buf[start:end])
        del buf[:end]
        return message

    def next(self) -> bytes | None:
        """The next message, reading until it is whole; None at end of file."""
        while (message := self.take()) is None:
            if not self.read():
                return None
        return message
