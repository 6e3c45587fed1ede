"""What a pool child and the worker send each other is cut from what one read of the pipe
brought, however the messages were split across reads."""

from __future__ import annotations

import os
import threading
from multiprocessing import Pipe

from django_tasks_q.worker.frames import READ_SIZE, Frames


def test_messages_sent_together_come_from_one_read_and_in_order() -> None:
    ours, theirs = Pipe(duplex=True)
    frames = Frames(ours.fileno())
    for data in (b"first", b"", b"third" * 100):
        theirs.send_bytes(data)
    assert frames.take() is None  # nothing read yet
    assert frames.read() is True
    assert [frames.take(), frames.take(), frames.take(), frames.take()] == [
        b"first", b"", b"third" * 100, None]


def test_a_message_larger_than_one_read_is_whole_once_it_has_all_arrived() -> None:
    ours, theirs = Pipe(duplex=True)
    frames = Frames(ours.fileno())
    big = os.urandom(READ_SIZE * 3 + 7)
    writer = threading.Thread(target=theirs.send_bytes, args=(big,))
    writer.start()
    assert frames.next() == big
    writer.join()
    theirs.send_bytes(b"after")
    assert frames.next() == b"after"


def test_the_end_of_file_is_none_after_what_came_before_it() -> None:
    ours, theirs = Pipe(duplex=True)
    frames = Frames(ours.fileno())
    theirs.send_bytes(b"last")
    theirs.close()
    assert frames.next() == b"last"
    assert frames.next() is None
    assert frames.read() is False


def test_an_eight_byte_length_is_read_as_multiprocessing_writes_it() -> None:
    r, w = os.pipe()
    frames = Frames(r)
    os.write(w, b"\xff\xff\xff\xff" + (5).to_bytes(8, "big") + b"hello")
    assert frames.next() == b"hello"
