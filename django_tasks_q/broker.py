"""Adapters: the broker connection, queue declarations and publishing through kombu."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, NoReturn

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.exceptions import DecodeError
from kombu.message import Message
from kombu.messaging import Producer
from kombu.pidbox import Mailbox
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from . import conf
from .confirms import Confirms, ConfirmTimeout
from .exceptions import EnqueueError
from .message import CONTENT_TYPE
from .transport import amqp as amqp_transport
from .transport import redis as redis_transport
from .transport import wirejson

TRANSPORT_ALIASES.setdefault("django", "django_tasks_q.transport.django:Transport")

logger = logging.getLogger("django_tasks_q.broker")

# Bounded: a publish during an outage retries for a few seconds, then the caller hears of it.
PUBLISH_RETRY_POLICY = {"max_retries": 4, "interval_start": 0.2, "interval_step": 0.5,
                        "interval_max": 1.0}


REDIS_VISIBILITY_TIMEOUT = 300

#: Task messages a process may have published to RabbitMQ or Redis unconfirmed (and keeps, to
#: send again) before a call waits for the broker's confirms or answers
#: (``BROKER_OPTIONS["confirm_window"]``; ``1`` waits for each message's). RabbitMQ confirms
#: persistent messages once they are on disk: a window of a few thousand lets a client go on
#: writing meanwhile.
CONFIRM_WINDOW = 4096
#: Seconds a wait for confirms may pass with nothing from RabbitMQ before it fails.
CONFIRM_TIMEOUT = 30.0

#: Priorities run from 0 (lowest, and what a message without one gets) to this (highest).
MAX_PRIORITY = 9
#: RabbitMQ's refusal of a declaration whose arguments differ from the existing queue's.
PRECONDITION_FAILED = 406

_warned_unprioritised: set[str] = set()
_warned_ignored: set[str] = set()


class Declared(NamedTuple):
    """What ``declare`` returns: the queues, ready to consume from, and the names of those
    RabbitMQ holds without priorities (declared so here)."""

    queues: list[Queue]
    plain: frozenset[str]


def queue(name: str, priority: int | None = None, declared: bool = False) -> Queue:
    """The durable queue ``name``, bound to a direct exchange of the same name (Celery's layout).

    With ``priority`` it carries ``x-max-priority`` = ``priority``: RabbitMQ orders by priority
    only in queues declared with it (other brokers ignore the argument). A ``declared`` queue
    is one kombu must not declare again (see ``declare``).
    """
    arguments = {"x-max-priority": priority} if priority else None
    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name, durable=True,
                 queue_arguments=arguments, no_declare=declared)


def configured_queue(name: str) -> Queue:
    """The queue ``name`` as this process's settings declare it (``max_priority``)."""
    return queue(name, conf.max_priority(conf.get().BROKER_OPTIONS))


def declare(conn: Connection, names: Iterable[str]) -> Declared:
    """Declare the queues ``names``, with ``x-max-priority`` where ``BROKER_OPTIONS
    ["max_priority"]`` asks for it (``conf.max_priority``); return them ready to consume from,
    not to be declared again, with the names of those RabbitMQ holds without priorities.

    A queue that exists already with other arguments (without our ``x-max-priority``, with
    another, or with one an earlier version of this app gave every queue) makes RabbitMQ refuse
    the declaration and close the channel. It is then used as it is; if priorities were asked
    for, one warning says that they may not be honoured and what to do about it.
    """
    wanted = conf.max_priority(conn.transport_options or {})
    amqp = conn.transport.driver_type == "amqp"
    ready: list[Queue] = []
    plain: set[str] = set()
    # A channel of its own: the one a refusal closes is never the caller's.
    channel = conn.channel()
    try:
        for name in names:
            try:
                queue(name, wanted).declare(channel=channel)
            except conn.channel_errors as exc:
                if getattr(exc, "reply_code", None) != PRECONDITION_FAILED:
                    raise
                with contextlib.suppress(Exception):  # closed by the broker already
                    channel.close()
                channel = conn.channel()
                found = queue(name)
                found.exchange.declare(channel=channel)
                # Passive: whatever arguments the queue has, it is accepted as it is.
                found.queue_declare(passive=True, channel=channel)
                found.queue_bind(channel=channel)
                _note_found(name, wanted)
            else:
                if amqp and not wanted:
                    plain.add(name)
            ready.append(queue(name, wanted, declared=True))
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return Declared(ready, frozenset(plain))


def _note_found(name: str, wanted: int | None) -> None:
    if not wanted:
        logger.info("Queue %r exists with arguments of its own (x-max-priority from an earlier "
                    "version of django-tasks-q, or Celery's task_queue_max_priority); using it "
                    "as it is", name)
        return
    if name in _warned_unprioritised:
        return
    _warned_unprioritised.add(name)
    logger.warning(
        "Queue %r was declared earlier without x-max-priority=%d (by Celery, or with another "
        "BROKER_OPTIONS['max_priority']), so RabbitMQ may not honour task priorities on it; "
        "using it as it is. To have them honoured, drain the queue and delete it, so that it is "
        "declared again with the argument; where Celery workers or clients share it, first set "
        "task_queue_max_priority = %d in their configuration.",
        name, wanted, wanted)


def warn_priority_ignored(queue_name: str, priority: int) -> None:
    """Say once per queue that RabbitMQ does not honour ``priority`` on ``queue_name``, a queue
    declared without priorities."""
    if queue_name in _warned_ignored:
        return
    _warned_ignored.add(queue_name)
    logger.warning(
        "A task was sent to queue %r with priority=%d, but RabbitMQ holds that queue without "
        "priorities, so its messages are delivered oldest first. To have priorities honoured, "
        "set TASKS_Q['BROKER_OPTIONS']['max_priority'] = %d in every process, then drain the "
        "queue and delete it, so that the next worker declares it again with priorities.",
        queue_name, priority, MAX_PRIORITY)


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


def decode_body(raw: Message) -> Any:
    """``raw.decode()``; a JSON body, when accepted, by ``wirejson.loads`` (kombu's serializer
    registry adds its lookups, and an object hook run in Python, to every message)."""
    accept = raw.accept
    if (raw.content_type == CONTENT_TYPE and raw.body and accept is not None
            and CONTENT_TYPE in accept and (raw.content_encoding or "utf-8").lower() == "utf-8"):
        try:
            return wirejson.loads(raw.body)
        except ValueError as exc:
            raise DecodeError(exc) from exc
    return raw.decode()


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
    transport_options.pop("confirm_window", None)  # the publisher's, not kombu's
    scheme = url.split("://", 1)[0]
    if _is_amqp(url):
        transport_options.setdefault("confirm_publish", True)
    if scheme in ("amqp", "pyamqp"):
        transport: type = amqp_transport.Transport  # py-amqp's, reading ahead (amqps: as is)
    elif scheme in ("redis", "rediss"):
        # Workers keep the messages they hold alive (worker/consumer.py), so a short timeout
        # only shortens how long a dead worker's messages wait before they are delivered again.
        transport_options.setdefault("visibility_timeout", REDIS_VISIBILITY_TIMEOUT)
        transport_options.setdefault("unacked_restore_interval", 5)
        transport_options.setdefault("unacked_restore_throttle", 2)
        # Our transport takes a message off its queue and records it as unacked in one step
        # (transport/redis.py).
        transport = redis_transport.Transport
    else:
        return Connection(url, transport_options=transport_options)
    # The URL is still read as kombu reads it (rediss:// and ?ssl= mean TLS).
    return Connection(url, transport=transport, ssl=Connection(url).ssl,
                      transport_options=transport_options)


def _is_amqp(url: str) -> bool:
    return url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def safe_url(url: str | None = None) -> str:
    """The broker URL with its password masked, fit for logs."""
    return str(Connection(url or conf.get().BROKER_URL).as_uri(include_password=False))


def masked(text: str, url: str | None = None) -> str:
    """``text`` (an error message, say) with the broker password replaced by ``****``."""
    password = Connection(url or conf.get().BROKER_URL).password
    return text.replace(password, "****") if password else text


class _Outgoing(NamedTuple):
    """One encoded task message on its way to ``queue_name``."""

    body: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    queue_name: str
    priority: int | None


class Publisher:
    """One process's publishing connection; thread-safe, rebuilt after fork.

    On RabbitMQ and Redis a message is kept until the broker confirms it (RabbitMQ's publisher
    confirms, see confirms.py; Redis's answer to the ``LPUSH``, see transport/redis.py): a call
    with ``wait`` returns once every message so far is confirmed; one without returns once its
    message is written, and its confirm is read by a later call that waits, by ``flush()``, or
    once ``confirm_window`` messages are outstanding (then until half of them are left; a
    window of 1 waits for each message's). What a failed connection had not confirmed is sent
    again on the next one."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options
        self._window = max(1, int(options.get("confirm_window", CONFIRM_WINDOW)))
        # On RabbitMQ, confirms are read here (confirms.py), not by py-amqp (which would wait
        # for each message's).
        self._confirm = _is_amqp(url) and bool(options.get("confirm_publish", True))
        self._options = dict(options, confirm_publish=False) if self._confirm else options
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._producer: Producer | None = None
        self._direct = False
        self._confirms: Confirms[_Outgoing] | None = None
        self._outbox: deque[_Outgoing] = deque()
        #: Redis: pushes a lost connection had not answered, to push again on a new one.
        self._carried: list[redis_transport.Pushed] = []
        #: Queues declared on this connection: whether RabbitMQ holds each without priorities.
        self._declared: dict[str, bool] = {}
        #: kombu's retrying wrappers of the calls below, built once per connection.
        self._retrying: dict[str, Callable[[], None]] = {}

    def publish(self, body: str, headers: dict[str, Any], properties: dict[str, Any],
                queue_name: str, priority: int | None = None, wait: bool = True) -> None:
        """Publish one encoded task message to ``queue_name`` (persistent; on RabbitMQ
        confirmed, before this returns with ``wait``, else later, see the class)."""
        with self._lock:
            conn = self._conn
            if conn is None or self._producer is None:
                conn = self._conn = connection(self.url, self._options)
                self._producer = Producer(conn, auto_declare=False)
                # Redis: one LPUSH on the channel's client, no per-publish kombu machinery.
                self._direct = isinstance(conn.transport, redis_transport.Transport)
            unsent = headers.get("id")
            try:
                if queue_name not in self._declared:
                    # Connecting is retried like the publish below; the queue is declared on a
                    # channel of its own (see declare()), never on the producer's.
                    conn.ensure_connection(**PUBLISH_RETRY_POLICY)
                    self._declared[queue_name] = queue_name in declare(conn, [queue_name]).plain
                if priority and self._declared[queue_name]:
                    warn_priority_ignored(queue_name, priority)
                if self._direct:
                    self._on_redis(lambda channel: channel.put_direct(
                        queue_name, body, headers, dict(properties, delivery_mode=2),
                        wire_priority(conn, priority), wait=wait, window=self._window))
                    return
                if self._confirm:
                    self._outbox.append(_Outgoing(body, headers, properties, queue_name, priority))
                    self._ensured(self._collect if wait else self._send_outbox)
                    if not wait and self._confirms is not None and (
                            len(self._confirms) >= self._window):
                        unsent = None  # written: a failure now loses it with the others
                        self._ensured(self._make_room)
                    return
                # The default exchange routes by queue name with no binding lookup: one round
                # trip less per message on Redis and django://, the same queue on AMQP.
                self._producer.publish(
                    body, exchange="", routing_key=queue_name, headers=headers,
                    content_type="application/json", content_encoding="utf-8",
                    priority=wire_priority(conn, priority), delivery_mode=2, retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY, **properties)
            except Exception as exc:
                self._raise(exc, unsent)

    def flush(self) -> None:
        """Return once RabbitMQ or Redis has confirmed every message published so far (at once
        on the other brokers); ``EnqueueError`` names what it refused or what could not be
        sent."""
        with self._lock:
            try:
                if self._outbox or self._confirms:
                    self._ensured(self._collect)
                elif (channel := self._redis_channel()) and channel.unanswered:
                    self._on_redis(redis_transport.Channel.settle)
            except Exception as exc:
                self._raise(exc)

    def _redis_channel(self) -> redis_transport.Channel | None:
        """The producer's channel on Redis, if it is made (reading ``channel`` would connect)."""
        made = getattr(self._producer, "_channel", None)
        return made if isinstance(made, redis_transport.Channel) else None

    def _on_redis(self, call: Callable[[redis_transport.Channel], None]) -> None:
        """``call(channel)`` on the producer's Redis channel; if its connection is lost, what
        it had not answered is pushed again on a new one."""
        assert self._conn is not None and self._producer is not None
        channel = self._producer.channel
        try:
            call(channel)
        except self._conn.connection_errors:
            self._push_again(channel)

    def _push_again(self, channel: redis_transport.Channel) -> None:
        """After ``channel`` lost its connection: push what it had not answered again, on a
        new connection (kombu's ``ensure`` makes it), and wait for the answers."""
        self._carried.extend(channel.take_unanswered())
        self._ensured(self._push_carried)

    def _push_carried(self) -> None:
        assert self._producer is not None
        channel = self._producer.channel
        carried, self._carried = self._carried, []
        try:
            channel.push(carried)
        except BaseException:
            self._carried = channel.take_unanswered()
            raise

    def _ensured(self, fun: Callable[[], None]) -> None:
        """``fun()``, retried on a new connection (kombu's ``ensure``) while the policy allows.
        It is called plainly first: kombu's wrapper costs a good part of a publish."""
        assert self._conn is not None and self._producer is not None
        try:
            return fun()
        except (*self._conn.recoverable_connection_errors,
                *self._conn.recoverable_channel_errors):
            pass  # kombu's wrapper calls it again, and reconnects when that fails too
        call = self._retrying.get(fun.__name__)
        if call is None:
            call = self._retrying[fun.__name__] = self._conn.ensure(
                self._producer, fun, **PUBLISH_RETRY_POLICY)
        call()

    def _send_outbox(self) -> None:
        """Write what waits in the outbox; on a new channel, first what the old one had not
        confirmed."""
        assert self._conn is not None and self._producer is not None
        channel = self._producer.channel
        if self._confirms is None or self._confirms.channel is not channel:
            if self._confirms is not None:
                self._outbox.extendleft(reversed(self._confirms.outstanding()))
                self._confirms = None
            self._confirms = Confirms(channel)
        while self._outbox:
            item = self._outbox[0]
            # Straight to the socket, the frames kombu's producer would have py-amqp write
            # (transport/amqp.py).
            amqp_transport.publish(channel, item.queue_name, item.body.encode(), {
                "content_type": "application/json", "content_encoding": "utf-8",
                "application_headers": item.headers, "delivery_mode": 2,
                "priority": wire_priority(self._conn, item.priority), **item.properties})
            self._confirms.sent(self._outbox.popleft())

    def _make_room(self) -> None:
        """Read confirms until at most half the window is unconfirmed: RabbitMQ confirms the
        rest while the next messages are written."""
        self._collect(self._window // 2)

    def _collect(self, left: int = 0) -> None:
        """Send what waits, then read confirms until at most ``left`` messages are
        unconfirmed; raise for refused ones."""
        self._send_outbox()
        assert self._confirms is not None
        try:
            refused = self._confirms.wait(CONFIRM_TIMEOUT, left)
            if refused and left:
                # The error drops the connection: what it holds is confirmed first, so that
                # nothing RabbitMQ took is reported lost.
                refused += self._confirms.wait(CONFIRM_TIMEOUT)
        except ConfirmTimeout as exc:
            raise EnqueueError(str(exc)) from None
        if refused:
            raise EnqueueError(
                f"RabbitMQ refused {len(refused)} task message(s) "
                f"({_ids([item.headers.get('id') for item in refused])}): they "
                f"were not sent (a queue at its x-max-length with x-overflow=reject-publish "
                f"refuses messages, as does a broker error)")

    def _raise(self, exc: Exception, task_id: str | None = None) -> NoReturn:
        """Raise ``EnqueueError`` for ``exc``; the connection is dropped, and with it what it
        held unconfirmed, which the error names."""
        lost = [lost_id for lost_id in self._reset() if lost_id != task_id]
        if isinstance(exc, redis_transport.Refused):
            refused = [refused_id for refused_id, _ in exc.refused]
            error = EnqueueError(f"Redis refused {len(refused)} task message(s) "
                                 f"({_ids(refused)}): they were not sent ({exc})")
        elif isinstance(exc, EnqueueError):
            error = exc
        else:
            error = EnqueueError(
                f"Could not publish to {safe_url(self.url)} ({type(exc).__name__}: {exc})"
                + ("; the task was not sent" if task_id is not None else ""))
        if lost:
            # Their callers have returned: this log is where they are heard of.
            error = EnqueueError(f"{error}; {len(lost)} task message(s) sent earlier that "
                                 f"the broker had not confirmed were not sent ({_ids(lost)})")
            logger.error("%s", error)
        if error is exc:
            raise exc
        raise error from exc

    def _reset(self) -> list[str | None]:
        """Drop the connection; the task ids of what it held unconfirmed (now dropped too)."""
        held = [*(self._confirms.outstanding() if self._confirms else []), *self._outbox]
        lost = [item.headers.get("id") for item in held]
        if channel := self._redis_channel():
            self._carried += channel.take_unanswered()
        lost += [pushed.task_id for pushed in self._carried]
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the connection is broken already
                self._conn.release()
        self._conn = self._producer = self._confirms = None
        self._outbox.clear()
        self._carried.clear()
        self._direct = False
        self._declared.clear()
        self._retrying.clear()
        return lost

    def close(self) -> None:
        """Close the connection (it reopens on the next publish), once what it published is
        confirmed; a failure to confirm is logged."""
        with _logged():
            self.flush()
        with self._lock:
            self._reset()


def _ids(task_ids: list[str | None]) -> str:
    ids = [str(task_id) for task_id in task_ids]
    return ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


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


def flush() -> None:
    """Return once the broker has confirmed every task message this process published
    (RabbitMQ's confirms, Redis's answers); ``EnqueueError`` names those it refused or that
    could not be sent."""
    pub = _publisher
    if pub is not None:
        pub.flush()


def flush_or_log(**_: Any) -> None:
    """``flush()``, for the end of a request and of the process: a failure is logged."""
    with _logged():
        flush()


@contextlib.contextmanager
def _logged() -> Iterator[None]:
    # Where nobody is left to raise to, the failure is logged (with the task ids it names).
    try:
        yield
    except EnqueueError as exc:
        logger.error("%s", exc)


atexit.register(flush_or_log)


def _forget_after_fork() -> None:
    # The parent's socket must not be written to (or closed) by a child: drop it unclosed.
    global _publisher, _publisher_lock
    _publisher = None
    _publisher_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
