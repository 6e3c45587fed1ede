"""Adapters: the broker connection, queue declarations and publishing through kombu."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import TRANSPORT_ALIASES

from . import conf
from .exceptions import EnqueueError

TRANSPORT_ALIASES.setdefault("django", "django_tasks_q.transport.django:Transport")

# Bounded: a publish during an outage retries for a few seconds, then the caller hears of it.
PUBLISH_RETRY_POLICY = {"max_retries": 4, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 1.0}


REDIS_VISIBILITY_TIMEOUT = 300


def queue(name: str) -> Queue:
    """The durable queue ``name``, bound to a direct exchange of the same name (Celery's layout)."""
    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name, durable=True)


def connection(url: str | None = None, options: dict[str, Any] | None = None) -> Connection:
    """A new (lazy) kombu connection to the configured broker."""
    cfg = conf.get()
    url = url or cfg.BROKER_URL
    transport_options = dict(cfg.BROKER_OPTIONS if options is None else options)
    scheme = url.split("://", 1)[0]
    if scheme in ("amqp", "amqps", "pyamqp"):
        transport_options.setdefault("confirm_publish", True)
    elif scheme in ("redis", "rediss"):
        # Workers keep the messages they hold alive (worker/consumer.py), so a short timeout
        # only shortens how long a dead worker's messages wait before they are delivered again.
        transport_options.setdefault("visibility_timeout", REDIS_VISIBILITY_TIMEOUT)
        transport_options.setdefault("unacked_restore_interval", 5)
        transport_options.setdefault("unacked_restore_throttle", 2)
    return Connection(url, transport_options=transport_options)


def safe_url(url: str | None = None) -> str:
    """The broker URL with its password masked, fit for logs."""
    return str(Connection(url or conf.get().BROKER_URL).as_uri(include_password=False))


class Publisher:
    """One process's publishing connection; thread-safe, rebuilt after fork."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._producer: Producer | None = None
        self._declared: set[str] = set()

    def publish(self, body: str, headers: dict[str, Any], properties: dict[str, Any],
                queue_name: str, priority: int | None = None) -> None:
        """Publish one encoded task message to ``queue_name`` (persistent, confirmed on AMQP)."""
        with self._lock:
            if self._producer is None:
                self._conn = connection(self.url, self.options)
                self._producer = Producer(self._conn, auto_declare=False)
            declare = [] if queue_name in self._declared else [queue(queue_name)]
            try:
                # The default exchange routes by queue name with no binding lookup: one round
                # trip less per message on Redis and django://, the same queue on AMQP.
                self._producer.publish(
                    body, exchange="", routing_key=queue_name, headers=headers,
                    content_type="application/json", content_encoding="utf-8",
                    priority=priority, delivery_mode=2, declare=declare, retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY, **properties)
            except Exception as exc:
                self._reset()
                if isinstance(exc, EnqueueError):
                    raise
                raise EnqueueError(f"Could not publish to {safe_url(self.url)} "
                                   f"({type(exc).__name__}: {exc}); the task was not sent") from exc
            self._declared.add(queue_name)

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the connection is broken already
                self._conn.release()
        self._conn = self._producer = None
        self._declared.clear()

    def close(self) -> None:
        """Close the connection (it reopens on the next publish)."""
        with self._lock:
            self._reset()


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def publisher() -> Publisher:
    """This process's publisher for the configured broker."""
    global _publisher
    cfg = conf.get()
    pub = _publisher
    if pub is None or pub.url != cfg.BROKER_URL or pub.options != cfg.BROKER_OPTIONS:
        with _publisher_lock:
            if _publisher is not None:
                _publisher.close()
            pub = _publisher = Publisher(cfg.BROKER_URL, dict(cfg.BROKER_OPTIONS))
    return pub


def _forget_after_fork() -> None:
    # The parent's socket must not be written to (or closed) by a child: drop it unclosed.
    global _publisher, _publisher_lock
    _publisher = None
    _publisher_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
