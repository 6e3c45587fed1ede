"""Adapters: a pool of kombu producers for messages that are not tasks (``extensions.publish``).

Task messages go through ``broker.Publisher``, which writes Celery's format its own way. A
message for a queue of a worker extension has the exchange, routing key and body its sender
chooses, so it goes through kombu's ``Producer`` as written, taken from a pool of this
process's connections to the configured broker (threads publish side by side). The pool is
dropped, unclosed, in a forked child: its sockets are the parent's.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from kombu.messaging import Producer
from kombu.pools import ProducerPool

from . import broker, conf

#: Connections (and producers) a process may hold open for ``extensions.publish``.
POOL_LIMIT = 10

_pool: ProducerPool | None = None
_pool_key: tuple[str, str] | None = None
_lock = threading.Lock()


def pool() -> ProducerPool:
    """This process's producer pool for the configured broker (a new one if it changed)."""
    global _pool, _pool_key
    cfg = conf.get()
    key = (cfg.BROKER_URL, repr(cfg.BROKER_OPTIONS))
    with _lock:
        if _pool is None or _pool_key != key:
            if _pool is not None:
                with contextlib.suppress(Exception):  # connections to the old broker
                    _pool.connections.force_close_all()
            connections: Any = broker.connection().Pool(limit=POOL_LIMIT)
            _pool, _pool_key = ProducerPool(connections, limit=POOL_LIMIT), key
        return _pool


@contextlib.contextmanager
def acquire() -> Iterator[Producer]:
    """A producer from the pool, on a connection of its own, for the ``with`` block."""
    with pool().acquire(block=True) as producer:
        yield producer


def _forget_after_fork() -> None:
    global _pool, _pool_key, _lock
    _pool, _pool_key, _lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
