"""Adapters: the broker connection, queue declarations and publishing through kombu."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Producer
from kombu.pidbox import Mailbox
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from . import conf
from .exceptions import EnqueueError
from .transport import redis as redis_transport

TRANSPORT_ALIASES.setdefault("django", "django_tasks_q.transport.django:Transport")

logger = logging.getLogger("django_tasks_q.broker")

# Bounded: a publish during an outage retries for a few seconds, then the caller hears of it.
PUBLISH_RETRY_POLICY = {"max_retries": 4, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 1.0}


REDIS_VISIBILITY_TIMEOUT = 300

#: Priorities run from 0 (lowest, and what a message without one gets) to this (highest).
MAX_PRIORITY = 9
#: RabbitMQ's refusal of a declaration whose arguments differ from the existing queue's.
PRECONDITION_FAILED = 406

_warned_unprioritised: set[str] = set()


def queue(name: str, priorities: bool = True, declared: bool = False) -> Queue:
    """The durable queue ``name``, bound to a direct exchange of the same name (Celery's layout).

    With ``priorities`` it carries ``x-max-priority``: RabbitMQ orders by priority only in
    queues declared with it (other brokers ignore the argument). A ``declared`` queue is one
    kombu must not declare again (see ``declare``).
    """
    arguments = {"x-max-priority": MAX_PRIORITY} if priorities else None
    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name, durable=True,
                 queue_arguments=arguments, no_declare=declared)


def declare(conn: Connection, names: Iterable[str]) -> list[Queue]:
    """Declare the queues ``names``; return them ready to consume from, not to be declared again.

    A queue that exists already without our ``x-max-priority`` (declared by Celery, or by an
    older version of this app) makes RabbitMQ refuse the declaration and close the channel. It
    is then used as it is, without priorities, and one warning says what to do about it.
    """
    ready: list[Queue] = []
    # A channel of its own: the one a refusal closes is never the caller's.
    channel = conn.channel()
    try:
        for name in names:
            priorities = True
            try:
                queue(name).declare(channel=channel)
            except conn.channel_errors as exc:
                if getattr(exc, "reply_code", None) != PRECONDITION_FAILED:
                    raise
                with contextlib.suppress(Exception):  # closed by the broker already
                    channel.close()
                channel = conn.channel()
                priorities = False
                plain = queue(name, priorities=False)
                plain.exchange.declare(channel=channel)
                # Passive: whatever arguments the queue has, it is accepted as it is.
                plain.queue_declare(passive=True, channel=channel)
                plain.queue_bind(channel=channel)
                _warn_unprioritised(name)
            ready.append(queue(name, priorities=priorities, declared=True))
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return ready


def _warn_unprioritised(name: str) -> None:
    if name in _warned_unprioritised:
        return
    _warned_unprioritised.add(name)
    logger.warning(
        "Queue %r was declared earlier without x-max-priority=%d (by Celery, or by an older "
        "version of django-tasks-q), so RabbitMQ does not honour task priorities on it; using "
        "it as it is. To have them honoured, drain the queue and delete it, so that it is "
        "declared again with the argument; where Celery workers or clients share it, first set "
        "task_queue_max_priority = %d in their configuration.",
        name, MAX_PRIORITY, MAX_PRIORITY)


def queue_size(channel: Any, name: str) -> int:
    """Messages ready for delivery in queue ``name`` (not those delivered and unacknowledged).

    On AMQP a queue that does not exist is a channel error (404) that closes ``channel``.
    """
    if hasattr(channel, "_size"):  # kombu's virtual transports: Redis, django://, memory://
        return int(channel._size(name))
    return int(channel.queue_declare(queue=name, passive=True).message_count)


def wire_priority(conn: Connection, priority: int | None) -> int | None:
    """The priority a message is published with on ``conn``'s broker.

    Ours runs higher first, as on AMQP and ``django://``; kombu's Redis transport serves lower
    numbers first, so there it is inverted (and no priority becomes our lowest, 0).
    """
    if isinstance(conn.transport, kombu_redis.Transport):
        return MAX_PRIORITY - _clamp(int(priority or 0))
    return priority


def received_priority(raw: Message) -> int | None:
    """The priority of a received message in our terms (0–9, higher first), or None."""
    value = (raw.properties or {}).get("priority")
    if value is None:
        return None
    try:
        priority = int(value)
    except (TypeError, ValueError):
        return None
    if isinstance(raw.channel, kombu_redis.Channel):
        priority = MAX_PRIORITY - priority
    return _clamp(priority)


def _clamp(priority: int) -> int:
    return min(max(priority, 0), MAX_PRIORITY)


#: Remote control as Celery names it: each worker's queue ``<hostname>.celery.pidbox`` is bound
#: to the fanout exchange ``celery.pidbox``; replies go through ``reply.celery.pidbox``.
CONTROL_EXCHANGE = "celery"
#: Seconds an unread control message, and an unused control queue, lasts (Celery's defaults).
CONTROL_QUEUE_TTL = 300.0
CONTROL_QUEUE_EXPIRES = 10.0


def mailbox(conn: Connection | None = None) -> Mailbox:
    """The remote-control mailbox, declared exactly as Celery declares it, so Celery's tools
    (``celery inspect``, Flower) and ``taskctl`` reach the same workers."""
    box = Mailbox(CONTROL_EXCHANGE, type="fanout", accept=["json"], serializer="json",
                  queue_ttl=CONTROL_QUEUE_TTL, reply_queue_ttl=CONTROL_QUEUE_TTL,
                  queue_expires=CONTROL_QUEUE_EXPIRES, queue_exclusive=True,
                  queue_durable=False, reply_queue_expires=CONTROL_QUEUE_EXPIRES)
    return box(conn) if conn is not None else box


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
        # Our transport takes a message off its queue and records it as unacked in one step
        # (transport/redis.py); the URL is still read as kombu reads it (rediss:// means TLS).
        return Connection(url, transport=redis_transport.Transport, ssl=Connection(url).ssl,
                          transport_options=transport_options)
    return Connection(url, transport_options=transport_options)


def safe_url(url: str | None = None) -> str:
    """The broker URL with its password masked, fit for logs."""
    return str(Connection(url or conf.get().BROKER_URL).as_uri(include_password=False))


def masked(text: str, url: str | None = None) -> str:
    """``text`` (an error message, say) with the broker password replaced by ``****``."""
    password = Connection(url or conf.get().BROKER_URL).password
    return text.replace(password, "****") if password else text


class Publisher:
    """One process's publishing connection; thread-safe, rebuilt after fork."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._producer: Producer | None = None
        self._direct = False
        self._declared: set[str] = set()

    def publish(self, body: str, headers: dict[str, Any], properties: dict[str, Any],
                queue_name: str, priority: int | None = None) -> None:
        """Publish one encoded task message to ``queue_name`` (persistent, confirmed on AMQP)."""
        with self._lock:
            conn = self._conn
            if conn is None or self._producer is None:
                conn = self._conn = connection(self.url, self.options)
                self._producer = Producer(conn, auto_declare=False)
                # Redis: one LPUSH on the channel's client, no per-publish kombu machinery.
                self._direct = isinstance(conn.transport, redis_transport.Transport)
            try:
                if queue_name not in self._declared:
                    # Connecting is retried like the publish below; the queue is declared on a
                    # channel of its own (see declare()), never on the producer's.
                    conn.ensure_connection(**PUBLISH_RETRY_POLICY)
                    declare(conn, [queue_name])
                    self._declared.add(queue_name)
                if self._direct:
                    try:
                        self._producer.channel.put_direct(
                            queue_name, body, headers, dict(properties, delivery_mode=2),
                            wire_priority(conn, priority))
                        return
                    except conn.connection_errors:
                        pass  # the producer below reconnects and retries
                # The default exchange routes by queue name with no binding lookup: one round
                # trip less per message on Redis and django://, the same queue on AMQP.
                self._producer.publish(
                    body, exchange="", routing_key=queue_name, headers=headers,
                    content_type="application/json", content_encoding="utf-8",
                    priority=wire_priority(conn, priority), delivery_mode=2, retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY, **properties)
            except Exception as exc:
                self._reset()
                if isinstance(exc, EnqueueError):
                    raise
                raise EnqueueError(f"Could not publish to {safe_url(self.url)} "
                                   f"({type(exc).__name__}: {exc}); the task was not sent") from exc

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the connection is broken already
                self._conn.release()
        self._conn = self._producer = None
        self._direct = False
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
