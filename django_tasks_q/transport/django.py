"""Adapters: the embedded ``django://`` broker, a kombu virtual transport over the Django ORM.

Each message is one ``QueueMessage`` row. A consumer claims rows with a lease (``visible_at``
moved ``visibility_timeout`` seconds ahead), renews the leases of what it still holds while it
polls, and deletes a row when the message is acked; a consumer that dies simply stops renewing,
so its messages are delivered again once their leases run out. Exchanges route by bindings
kept in the database (``bindings.py``), so remote control works across processes. On
PostgreSQL an idle consumer waits for a notification of a publish instead of polling
(``pgnotify.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from functools import reduce
from operator import or_
from queue import Empty
from typing import TYPE_CHECKING, Any, TypeVar

import django
from django.db import DatabaseError, InterfaceError, OperationalError, connections
from django.db.models import F, Q
from django.utils import timezone
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.utils.json import loads

from . import pgnotify
from .acks import BatchedAcks
from .base import VirtualQoS, VirtualTransport
from .bindings import EXPIRES_AT, RoutingChannel, State

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

    from django_tasks_q.models import QueueMessage

logger = logging.getLogger(__name__)

T = TypeVar("T")
Raw = dict[str, Any]
Row = tuple[int, str, str, int, int]  # id, queue, payload, deliveries (this one included), priority

PG_CLAIM = """
UPDATE {table} AS m SET visible_at = %s, claimed_by = %s, deliveries = m.deliveries + 1
FROM (
    SELECT c.id FROM unnest(%s::varchar[]) AS q(name) CROSS JOIN LATERAL (
        SELECT id, priority FROM {table} WHERE queue = q.name AND visible_at <= %s
        ORDER BY priority DESC, id LIMIT %s FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority DESC, c.id LIMIT %s
) AS picked
WHERE m.id = picked.id
RETURNING m.id, m.queue, m.payload, m.deliveries, m.priority
"""

#: Most rows one claim takes, however much the consumer's prefetch would allow.
CLAIM_MAX = 32
#: Tries of a statement SQLite refuses with "database is locked" (each after its busy timeout).
LOCKED_TRIES = 4
#: Most messages one wake-up by a notification hands out before the event loop runs again.
WAKE_MOST = 1000

_wal_databases: set[str] = set()


def register() -> None:
    """Make ``kombu.Connection("django://")`` use this transport (idempotent)."""
    TRANSPORT_ALIASES["django"] = "django_tasks_q.transport.django:Transport"


def _tag(row_id: int, deliveries: int) -> str:
    # The tag names the row and which delivery of it this is, so any channel can settle it
    # and a stale settle cannot touch a row that has since gone to another consumer.
    return f"{row_id}.{deliveries}"


def _parse_tag(tag: str) -> tuple[int, int]:
    row_id, _, deliveries = str(tag).partition(".")
    return int(row_id), int(deliveries or 0)


def _is_locked(db: BaseDatabaseWrapper, exc: Exception) -> bool:
    return db.vendor == "sqlite" and "locked" in str(exc)


def _prefer_wal(db: BaseDatabaseWrapper) -> None:
    """Switch a SQLite file to WAL, where a publisher and consumers do not block each other."""
    name = f"{db.alias}:{db.settings_dict.get('NAME')}"
    if db.vendor != "sqlite" or db.in_atomic_block or name in _wal_databases:
        return
    try:
        with db.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
    except DatabaseError as exc:  # another connection is mid-write: try at the next connect
        logger.debug("Could not switch %s to WAL yet: %s", name, exc)
    else:
        _wal_databases.add(name)


class QoS(BatchedAcks, VirtualQoS):
    """Unacked-message bookkeeping whose acks and rejects reach the database (acks one by one,
    or together: ``BatchedAcks``)."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        """Delete the acknowledged message's row."""
        self.channel._settle([delivery_tag], requeue=False)
        super().ack(delivery_tag)

    def send_acks(self, delivery_tags: list[str]) -> None:
        """Delete the rows of many acknowledged messages in one statement."""
        self.channel._settle(delivery_tags, requeue=False)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Make the row visible again at once (requeue) or delete it."""
        self.channel._settle([delivery_tag], requeue=requeue)
        # Not super(): the base class would publish a copy, but the row itself goes back.
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[Exception, Any]]:
        """Give every unacked message of this channel back to its queue at once."""
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        try:
            self.channel._settle(tags, requeue=True)
        except DatabaseError as exc:
            # Nothing is lost: the leases run out and the rows are delivered again.
            logger.warning("Could not give back %d unacked message(s): %s", len(tags), exc)
        return []


class Channel(RoutingChannel):
    """A session on the ``QueueMessage`` table: publishes rows, claims, renews and settles them."""

    QoS = QoS
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        from django_tasks_q.models import QueueMessage  # import late: the app registry is ready

        self.model: type[QueueMessage] = QueueMessage
        self.database: str = connection.database
        self.visibility_timeout: float = connection.visibility_timeout
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._buffer: deque[tuple[str, Raw]] = deque()  # claimed, not yet handed to a consumer
        self._held: dict[str, int] = {}  # tag -> row id: claimed here and not yet settled
        self._no_ack: set[str] = set()
        self._renew_at = time.monotonic() + self.visibility_timeout / 3
        self._quiet_until = 0.0  # monotonic time before which an empty channel is not polled

    @property
    def db(self) -> BaseDatabaseWrapper:
        """The calling thread's connection to the broker database."""
        return connections[self.database]

    def _rows(self) -> QuerySet[QueueMessage]:
        return self.model.objects.using(self.database)

    def _run(self, step: Callable[[], T]) -> T:
        """Run one database step, surviving a dropped connection and SQLite's write lock."""
        tries = 0
        reconnected = False
        while True:
            tries += 1
            try:
                return step()
            except (OperationalError, InterfaceError) as exc:
                db = self.db
                if db.in_atomic_block:
                    raise  # the caller's transaction is spoilt; only its owner may retry it
                if _is_locked(db, exc):
                    if tries >= LOCKED_TRIES:
                        raise
                    time.sleep(0.05 * tries)
                elif reconnected:
                    raise  # the database is down: kombu's reconnect machinery takes over
                else:
                    # A server restart leaves a dead socket behind; one fresh connection
                    # tells a blip from an outage.
                    logger.warning("django:// broker lost its database connection: %s", exc)
                    reconnected = True
                    with contextlib.suppress(DatabaseError):
                        db.close()

    # -- publishing and queue management --------------------------------------------------

    def _put(self, queue: str, message: Raw, **kwargs: Any) -> None:
        """Insert the message as a row; inside ``transaction.atomic()`` it joins the caller's.
        On PostgreSQL the same statement notifies the queue's listeners (on commit)."""
        payload, priority = self._payload(message), self._get_message_priority(message)
        now = timezone.now()
        if self.notifies:
            self._run(lambda: self._notifying(pgnotify.PUT, [
                queue, payload, priority, now, pgnotify.channel(queue)]))
        else:
            self._run(lambda: self._rows().create(queue=queue, payload=payload, priority=priority,
                                                  visible_at=now))

    @property
    def notifies(self) -> bool:
        """Whether publishing here notifies consumers (PostgreSQL, unless ``notify`` is off)."""
        return self.connection.notify and self.db.vendor == "postgresql"

    def _notifying(self, sql: str, params: list[Any]) -> None:
        """Run one of ``pgnotify``'s statements, which change rows of the message table and
        notify their queues' listeners together."""
        table = self.db.ops.quote_name(self.model._meta.db_table)
        with self.db.cursor() as cursor:
            cursor.execute(sql.format(table=table), params)

    def _ready(self, queue: str) -> QuerySet[QueueMessage]:
        return self._rows().filter(queue=queue, visible_at__lte=timezone.now())

    def _size(self, queue: str) -> int:
        """Messages ready for delivery; like AMQP, those in flight are not counted."""
        return self._run(lambda: self._ready(queue).count())

    def _purge(self, queue: str) -> int:
        """Delete the ready messages of `queue`; like AMQP, those in flight stay."""
        return self._run(lambda: self._ready(queue).delete()[0])

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        """Queues exist implicitly: any name may be published to and consumed from."""
        return True

    # -- consuming ----------------------------------------------------------------------------

    def _claim(self, queues: list[str], limit: int) -> list[tuple[str, Raw]]:
        """Lease up to `limit` of the first ready rows of `queues` to this channel."""
        now = timezone.now()
        lease = now + timedelta(seconds=self.visibility_timeout)
        if self.db.vendor == "postgresql":
            found = self._claim_skip_locked(queues, limit, now, lease)
        else:
            found = self._claim_conditionally(queues, limit, now, lease)
        found.sort(key=lambda row: (-row[4], row[0]))
        claimed = [self._decode(*row[:4]) for row in found]
        # A message past its ``expiration`` is dropped when it comes up, as RabbitMQ does.
        expired = {message["properties"]["delivery_tag"] for _, message in claimed
                   if message.pop(EXPIRES_AT, math.inf) <= time.time()}
        if expired:
            try:
                self._settle(expired, requeue=False)
            except DatabaseError:  # their leases run out, and the next claim drops them
                for tag in expired:
                    self._held.pop(tag, None)
            claimed = [(q, m) for q, m in claimed if m["properties"]["delivery_tag"] not in expired]
        return claimed

    def _claim_skip_locked(self, queues: list[str], limit: int, now: datetime,
                           lease: datetime) -> list[Row]:
        # One statement: an index scan per queue (a plain IN list would sort the whole
        # backlog), passing rows another consumer holds locked instead of waiting for them.
        table = self.db.ops.quote_name(self.model._meta.db_table)
        with self.db.cursor() as cursor:
            cursor.execute(PG_CLAIM.format(table=table),
                           [lease, self.owner, queues, now, limit, limit])
            return [tuple(row) for row in cursor.fetchall()]

    def _claim_conditionally(self, queues: list[str], limit: int, now: datetime,
                             lease: datetime) -> list[Row]:
        # No row locks (SQLite): the UPDATE takes only rows still ready, so of two
        # consumers racing for a row exactly one changes it, and it can tell which.
        rows = self._rows()
        which = {"queue": queues[0]} if len(queues) == 1 else {"queue__in": queues}
        ready = rows.filter(visible_at__lte=now, **which).order_by("-priority", "id")
        found = list(ready.values_list("id", "queue", "payload", "deliveries", "priority")
                     [:limit])
        ids = [row[0] for row in found]
        claim = {"visible_at": lease, "claimed_by": self.owner,
                 "deliveries": F("deliveries") + 1}
        if ids and rows.filter(id__in=ids, visible_at__lte=now).update(**claim) < len(ids):
            won = set(rows.filter(id__in=ids, claimed_by=self.owner, visible_at=lease)
                      .values_list("id", flat=True))
            found = [row for row in found if row[0] in won]
        return [(row_id, queue, payload, n + 1, prio) for row_id, queue, payload, n, prio in found]

    def _decode(self, row_id: int, queue: str, payload: str, deliveries: int) -> tuple[str, Raw]:
        message: Raw = loads(payload)
        tag = _tag(row_id, deliveries)
        properties = message["properties"]
        properties["delivery_tag"] = tag
        properties.setdefault("delivery_info", {})["redelivered"] = deliveries > 1
        self._held[tag] = row_id
        return queue, message

    def _claim_or_nothing(self, queues: list[str], limit: int) -> list[tuple[str, Raw]]:
        try:
            return self._run(lambda: self._claim(queues, limit))
        except OperationalError as exc:
            if not _is_locked(self.db, exc):
                raise
            logger.info("django:// broker: database stayed locked, polling again later")
            return []

    def _settle(self, tags: Iterable[str], requeue: bool, undelivered: bool = False) -> None:
        """Delete the claimed rows, or (requeue) make them visible again at once."""
        tags = list(tags)
        if not tags:
            return
        claims = [_parse_tag(tag) for tag in tags]
        if requeue and self.notifies:
            # One statement: the rows are visible again and their queues' listeners told so.
            self._run(lambda: self._notifying(pgnotify.REQUEUE, [
                timezone.now(), 1 if undelivered else 0,
                [row_id for row_id, _ in claims], [n for _, n in claims]]))
        elif requeue:
            match = reduce(or_, (Q(id=row_id, deliveries=n) for row_id, n in claims))
            changes: dict[str, Any] = {"visible_at": timezone.now(), "claimed_by": ""}
            if undelivered:  # never reached a consumer, so it does not count as redelivered
                changes["deliveries"] = F("deliveries") - 1
            self._run(lambda: self._rows().filter(match).update(**changes))
        else:
            self._run(lambda: self._delete_rows([row_id for row_id, _ in claims]))
        for tag in tags:
            self._held.pop(tag, None)

    def _delete_rows(self, ids: list[int]) -> None:
        # Plain SQL: QuerySet.delete() wraps the statement in a transaction of its own (and
        # may collect first), doubling the cost of every ack.
        table = self.db.ops.quote_name(self.model._meta.db_table)
        marks = ", ".join(["%s"] * len(ids))
        with self.db.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table} WHERE id IN ({marks})", ids)

    def renew_leases(self) -> None:
        """Every third of the lease, push forward the leases of all rows still held (and keep
        this process's expiring queues alive)."""
        self.keep_queues_alive()
        now = time.monotonic()
        if now < self._renew_at:
            return
        self._renew_at = now + self.visibility_timeout / 3
        ids = list(self._held.values())
        if not ids:
            return
        lease = timezone.now() + timedelta(seconds=self.visibility_timeout)
        try:
            self._run(lambda: self._rows().filter(id__in=ids, claimed_by=self.owner)
                      .update(visible_at=lease))
        except DatabaseError as exc:  # the next claim reports a lasting failure
            logger.warning("django:// broker could not renew %d lease(s): %s", len(ids), exc)

    def _give_back_buffer(self, queue: str | None = None) -> None:
        """Release the messages claimed but not yet delivered (of `queue`, or all)."""
        kept: deque[tuple[str, Raw]] = deque()
        dropped: list[str] = []
        for name, message in self._buffer:
            if queue is None or name == queue:
                dropped.append(message["properties"]["delivery_tag"])
            else:
                kept.append((name, message))
        self._buffer = kept
        try:
            self._settle(dropped, requeue=True, undelivered=True)
        except DatabaseError as exc:
            logger.warning("Could not give back %d prefetched message(s): %s", len(dropped), exc)

    def drain_events(self, timeout: float | None = None,
                     callback: Callable[[Raw, str], Any] | None = None) -> None:
        """Hand one message to the consumers, claiming a batch when none is waiting."""
        self.renew_leases()
        if not self._consumers or not self.qos.can_consume():
            raise Empty()
        if not self._buffer:
            now = time.monotonic()
            if now < self._quiet_until:
                raise Empty()
            queues = list(dict.fromkeys(self._active_queues))
            # Claim what prefetch allows; without a prefetch limit take one at a time,
            # so one consumer does not hoard what others could run.
            limit = min(self.qos.can_consume_max_estimate() or 1, CLAIM_MAX)
            self._buffer.extend(self._claim_or_nothing(queues, limit))
            if not self._buffer:
                self._quiet_until = now + self._rest(queues)
                raise Empty()
        queue, message = self._buffer.popleft()
        if queue in self._no_ack:
            self._settle([message["properties"]["delivery_tag"]], requeue=False)
        (callback or self.connection._deliver)(message, queue)

    def _rest(self, queues: list[str]) -> float:
        """Seconds an empty poll lets this channel rest: until the safety poll when a publish
        wakes it (LISTEN), a polling interval for remote control only, else none."""
        if self.connection.listening(queues):
            return self.connection.safety_poll_interval
        if self._polled_lazily(queues):
            return self.connection.polling_interval or 0.0
        return 0.0

    def _get(self, queue: str, timeout: float | None = None) -> Raw:
        claimed = self._claim_or_nothing([queue], 1)
        if not claimed:
            raise Empty()
        return claimed[0][1]

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """Claim one message of `queue`, or return None when it has none ready."""
        self.renew_leases()
        try:
            raw = self._get(queue)
        except Empty:
            return None
        message = self.Message(raw, channel=self)
        if no_ack:
            self._settle([message.delivery_tag], requeue=False)
        else:
            self.qos.append(message, message.delivery_tag)
        return message

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        """Consume from `queue`; with `no_ack` its rows are deleted as they are delivered."""
        if no_ack:
            self._no_ack.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> None:
        """Stop consuming, giving back messages of that queue claimed but not delivered."""
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._no_ack.discard(queue)
            self._give_back_buffer(queue)

    def close(self) -> None:
        """Close the channel, giving back every message it holds unacked."""
        if not self.closed:
            self._give_back_buffer()
        super().close()


class Transport(VirtualTransport):
    """kombu transport for ``django://``: the project's own database is the broker."""

    Channel = Channel

    #: Exchanges, and what this process declared, are shared by all its connections; the
    #: bindings that route messages are rows seen by every process (bindings.py).
    global_state = State()

    #: Seconds between polls of an idle consumer (transport option ``polling_interval``).
    polling_interval = 0.1
    #: Seconds between polls of an idle consumer that a notification wakes (PostgreSQL;
    #: transport option ``safety_poll_interval``).
    safety_poll_interval = 1.0

    driver_type = "sql"
    driver_name = "django"

    @property
    def default_connection_params(self) -> dict[str, Any]:
        # The database settings say where the broker is; there is no host to default to.
        return {}

    # kombu annotates these as one-element tuples; any tuple of exception types is meant.
    connection_errors = (  # type: ignore[assignment]
        *virtual.Transport.connection_errors, OperationalError, InterfaceError)
    channel_errors = (*virtual.Transport.channel_errors, DatabaseError)  # type: ignore[assignment]
    recoverable_connection_errors = connection_errors
    recoverable_channel_errors = ()

    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False)

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.state = self.global_state
        options = client.transport_options
        self.visibility_timeout = float(options.get("visibility_timeout", 60.0))
        self.database = str(options.get("database", "default"))
        self.notify = bool(options.get("notify", True))
        self.safety_poll_interval = float(
            options.get("safety_poll_interval", self.safety_poll_interval))
        self.listener: pgnotify.Listener | None = None
        self._loop: Any = None

    def establish_connection(self) -> Any:
        """Check that the database answers before kombu counts the connection as made."""
        db = connections[self.database]
        if db.connection is not None and not db.in_atomic_block and not db.is_usable():
            db.close()
        db.ensure_connection()
        _prefer_wal(db)
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        """Close the channels (giving back what they hold), then the listener."""
        try:
            super().close_connection(connection)
        finally:
            if self.listener is not None:
                self.listener.close()
            self.listener, self._loop = None, None

    # -- waking idle consumers ----------------------------------------------------------------

    def listening(self, queues: list[str]) -> bool:
        """Whether a publish to any of ``queues`` wakes this transport's consumers (PostgreSQL
        with ``notify``); listens for them when not yet."""
        if self.listener is None:
            if not self.notify or not pgnotify.available(self.database):
                return False
            self.listener = pgnotify.Listener(self.database, self._woken)
            if self._loop is not None:
                self.listener.attach(self._loop, self._on_readable)
        return self.listener.listening(queues)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Have the event loop (a kombu hub) wake the consumers as soon as a message is
        published to their queues, rather than at their next poll."""
        self._loop = loop
        if self.listener is not None:
            self.listener.attach(loop, self._on_readable)

    def _woken(self, queues: set[str] | None) -> None:
        # A notified channel claims at its next drain; None: the listener was lost.
        for channel in self.channels:
            if queues is None or not queues.isdisjoint(channel._active_queues):
                channel._quiet_until = 0.0

    def _on_readable(self) -> None:
        if self.listener is None:
            return
        heard = self.listener.heard
        self.listener.read()
        if self.listener.heard == heard:
            return
        for _ in range(WAKE_MOST):  # hand out what the woken channels claim, as a poll would
            try:
                self.drain_events(self, timeout=0)
            except TimeoutError:
                return
            except (*self.connection_errors, *self.channel_errors):
                raise  # the consumer reconnects
            except Exception:  # as from a poll timer: logged, and the event loop carries on
                logger.exception("django:// broker: could not deliver woken messages")
                return

    def drain_events(self, connection: Any, timeout: float | None = None,
                     **kwargs: Any) -> None:
        """Deliver one message, waiting up to ``timeout`` seconds; between polls wait on the
        listener's socket (PostgreSQL), or sleep ``polling_interval``."""
        started = time.monotonic()
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                left = math.inf if timeout is None else timeout - (time.monotonic() - started)
                if left <= 0:
                    raise TimeoutError() from None
                pause = min(self.polling_interval or 0.0, left)
                if self.listener is not None and self.listener.connected:
                    self.listener.wait(pause)
                else:
                    time.sleep(pause)

    def driver_version(self) -> str:
        """Django's version: the ORM is this transport's driver."""
        return django.get_version()
