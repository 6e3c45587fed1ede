"""Adapters: the ``django://`` broker's bindings, kept in the database for all processes.

kombu's virtual transports keep each exchange's bindings in process memory, so a queue bound by a
worker is unknown to a publisher in another process (``taskctl``, the admin, Celery's tools). Here
each binding is a ``QueueBinding`` row, and a publish to a fanout or direct exchange copies the
message into every matching queue with one ``INSERT … SELECT``: no lookup round trip, and all
copies or none. The default exchange (``""``, the task path) never looks at bindings.

Queues declared with ``x-expires`` (Celery's remote-control queues) carry a deadline on their rows,
which the process consuming them pushes forward while it runs. Rows past their deadline route
nothing; a sweep, at most every few seconds per process (from polls and declarations), deletes
them with their queues' messages, and deletes messages older than a queue's ``x-message-ttl``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from amqp.protocol import queue_declare_ok_t
from django.db import DatabaseError, connections, transaction
from django.db.models import Q
from django.utils import timezone
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.transport.virtual.exchange import STANDARD_EXCHANGE_TYPES, DirectExchange
from kombu.utils.json import dumps

from . import pgnotify
from .base import BrokerState, VirtualChannel

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

    from django_tasks_q.models import QueueBinding, QueueMessage

logger = logging.getLogger("django_tasks_q.transport.django")

T = TypeVar("T")
Raw = dict[str, Any]
#: exchange, routing key, pattern (topic exchanges), queue.
Binding = tuple[str, str, str, str]

ROUTE = """
INSERT INTO {messages} (queue, payload, priority, visible_at, claimed_by, deliveries)
SELECT DISTINCT queue, %s, %s, %s, '', 0 FROM {bindings}
WHERE exchange = %s{by_key} AND (expires_at IS NULL OR expires_at > %s)
"""

#: Seconds between two sweeps of expired queues by one process.
SWEEP_INTERVAL = 5.0
#: Key of the stored message holding when its ``expiration`` property runs out (epoch seconds).
EXPIRES_AT = "x-dtq-expires-at"


@dataclass(frozen=True)
class Expiry:
    """How long a queue lasts unused (``x-expires``) and a message unread in it, in seconds."""

    expires: float | None
    message_ttl: float | None

    @classmethod
    def of(cls, arguments: dict[str, Any] | None) -> Expiry | None:
        """The expiry queue ``arguments`` ask for (RabbitMQ's, in milliseconds), or None."""
        arguments = arguments or {}
        expires, ttl = arguments.get("x-expires"), arguments.get("x-message-ttl")
        if expires is None and ttl is None:
            return None
        return cls(None if expires is None else float(expires) / 1000,
                   None if ttl is None else float(ttl) / 1000)


class State(BrokerState):
    """kombu's per-process broker state, plus what this process knows of its queues' lifetimes."""

    def __init__(self) -> None:
        super().__init__()
        self.expiry: dict[str, Expiry] = {}  # queue -> as declared here
        self.auto_delete: set[str] = set()
        self.consumed: Counter[str] = Counter()  # queue -> consumers in this process
        self.refresh_at = math.inf  # monotonic time the consumed expiring queues are due
        self.sweep_at: dict[str, float] = {}  # database alias -> monotonic time of next sweep


class Bindings:
    """The binding rows of one database: bind, route by them, unbind, sweep."""

    def __init__(self, database: str) -> None:
        from django_tasks_q.models import QueueBinding, QueueMessage  # the app registry is ready

        self.database = database
        self.model: type[QueueBinding] = QueueBinding
        self.messages: type[QueueMessage] = QueueMessage

    @property
    def db(self) -> BaseDatabaseWrapper:
        """The calling thread's connection to the broker database."""
        return connections[self.database]

    def _rows(self) -> QuerySet[QueueBinding]:
        return self.model.objects.using(self.database)

    def bind(self, bindings: list[tuple[Binding, Expiry | None]]) -> None:
        """Create the rows, or refresh them: their expiry and deadline restart now."""
        now = timezone.now()
        rows = {}
        for (exchange, routing_key, pattern, queue), expiry in bindings:
            expires = expiry.expires if expiry else None
            rows[exchange, routing_key, queue] = self.model(
                exchange=exchange, routing_key=routing_key, pattern=pattern, queue=queue,
                expires=expires, message_ttl=expiry.message_ttl if expiry else None,
                expires_at=None if expires is None else now + timedelta(seconds=expires))
        # One statement, safe against another process binding the same row at the same time.
        self._rows().bulk_create(
            list(rows.values()), update_conflicts=True,
            unique_fields=["exchange", "routing_key", "queue"],
            update_fields=["pattern", "expires", "message_ttl", "expires_at"])

    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        """Delete one binding."""
        self._rows().filter(exchange=exchange, routing_key=routing_key, queue=queue).delete()

    def table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        """(routing key, pattern, queue) of each live binding of ``exchange``, as kombu wants."""
        live = Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now())
        rows = self._rows().filter(live, exchange=exchange)
        return [(key, pattern or None, queue)
                for key, pattern, queue in rows.values_list("routing_key", "pattern", "queue")]

    def route(self, exchange: str, routing_key: str | None, payload: str, priority: int,
              notify: bool = False) -> int:
        """Copy a message into every queue bound to ``exchange`` (with ``routing_key`` when one
        is given), in one statement that also notifies those queues (PostgreSQL, ``notify``);
        return how many queues it reached."""
        db = self.db
        quote = db.ops.quote_name
        sql = ROUTE.format(messages=quote(self.messages._meta.db_table),
                           bindings=quote(self.model._meta.db_table),
                           by_key="" if routing_key is None else " AND routing_key = %s")
        if notify:
            sql = pgnotify.route_and_notify(sql)
        now = db.ops.adapt_datetimefield_value(timezone.now())
        key = [] if routing_key is None else [routing_key]
        with db.cursor() as cursor:
            cursor.execute(sql, [payload, priority, now, exchange, *key, now])
            if notify:
                return len(cursor.fetchall())  # a row per queue reached
            routed: int = max(cursor.rowcount, 0)
            return routed

    def drop(self, queue: str) -> None:
        """Delete a queue: its bindings and all its messages, in flight or not."""
        with transaction.atomic(using=self.database):
            self._rows().filter(queue=queue).delete()
            self.messages.objects.using(self.database).filter(queue=queue).delete()

    def sweep(self) -> int:
        """Delete the queues past their deadline (rows and messages) and the messages older
        than their queue's ``x-message-ttl``; return how many messages went."""
        now = timezone.now()
        rows, messages = self._rows(), self.messages.objects.using(self.database)
        removed = 0
        dead = set(rows.filter(expires_at__lte=now).values_list("queue", flat=True)[:500])
        if dead:
            with transaction.atomic(using=self.database):
                rows.filter(queue__in=dead, expires_at__lte=now).delete()
                # A queue declared again meanwhile has a live row, and keeps its messages.
                kept = rows.filter(queue__in=dead).values("queue")
                removed += messages.filter(queue__in=dead).exclude(queue__in=kept).delete()[0]
        ttls = rows.filter(message_ttl__isnull=False).values_list("message_ttl", flat=True)
        for ttl in {ttl for ttl in ttls if ttl is not None}:
            queues = rows.filter(message_ttl=ttl).values("queue")
            # Ready since longer than the TTL; a message in flight has its lease ahead. Read
            # first: a sweep that finds nothing takes no write lock (SQLite has one for all).
            stale = messages.filter(queue__in=queues, visible_at__lt=now - timedelta(seconds=ttl))
            ids = list(stale.values_list("id", flat=True)[:1000])
            if ids:
                removed += messages.filter(id__in=ids).delete()[0]
        return removed


class Direct(DirectExchange):
    """A direct exchange routed by the binding rows, in one statement."""

    def deliver(self, message: Raw, exchange: str, routing_key: str, **kwargs: Any) -> None:
        """Copy ``message`` into every queue bound with ``routing_key``."""
        self.channel._put_direct(exchange, routing_key, message)


class RoutingChannel(VirtualChannel):
    """Exchanges and bindings of a ``django://`` channel, shared by all processes."""

    supports_fanout = True
    exchange_types = {**STANDARD_EXCHANGE_TYPES, "direct": Direct}
    database: str

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.bindings = Bindings(connection.database)

    @property
    def state(self) -> State:
        """This process's broker state (shared by all its connections)."""
        state: State = self.connection.state
        return state

    def _run(self, step: Callable[[], T]) -> T:
        return step()  # the storage channel retries over dropped connections and locks

    @property
    def notifies(self) -> bool:
        """Whether a publish notifies consumers (the storage channel knows)."""
        return False

    def _payload(self, message: Raw) -> str:
        """The message as stored; an ``expiration`` property (ms) becomes a deadline."""
        expiration = message["properties"].get("expiration")
        if expiration is not None:
            with contextlib.suppress(TypeError, ValueError):
                message[EXPIRES_AT] = time.time() + float(expiration) / 1000
        payload: str = dumps(message)
        return payload

    # -- declaring and binding --------------------------------------------------------------

    def prepare_queue_arguments(self, arguments: dict[str, Any] | None,
                                **kwargs: Any) -> dict[str, Any]:
        """Queue arguments as RabbitMQ names them (``expires`` becomes ``x-expires``...)."""
        prepared: dict[str, Any] = to_rabbitmq_queue_arguments(arguments or {}, **kwargs)
        return prepared

    def queue_declare(self, queue: str | None = None, passive: bool = False,
                      **kwargs: Any) -> Any:
        """Declare ``queue``; a passive declaration only asks (every name exists) and changes
        nothing that an earlier one set."""
        if passive and queue:
            return queue_declare_ok_t(queue, self._size(queue), 0)
        return super().queue_declare(queue, passive, **kwargs)

    def _new_queue(self, queue: str, auto_delete: bool = False,
                   arguments: dict[str, Any] | None = None, **kwargs: Any) -> None:
        state = self.state
        if auto_delete:
            state.auto_delete.add(queue)
        else:
            state.auto_delete.discard(queue)
        expiry = Expiry.of(arguments)
        if expiry is None:
            state.expiry.pop(queue, None)
            return
        state.expiry[queue] = expiry
        if queue in state.consumed:
            state.refresh_at = 0.0
        # Its place on the default exchange: an expiring queue is tracked even while unbound.
        self._run(lambda: self.bindings.bind([(("", queue, "", queue), expiry)]))
        self._maybe_sweep(time.monotonic())

    def queue_bind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                   arguments: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Bind ``queue`` for every process; binding again refreshes the row."""
        exchange = exchange or "amq.direct"
        key, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key,
                                                             arguments)
        self.state.binding_declare(queue, exchange, key, arguments)
        binding = (exchange, key, pattern or "", queue)
        self._run(lambda: self.bindings.bind([(binding, self.state.expiry.get(queue))]))

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = "",
                     arguments: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Remove the binding, for every process."""
        exchange = exchange or "amq.direct"
        self.state.binding_delete(queue, exchange, routing_key)
        self._run(lambda: self.bindings.unbind(exchange, routing_key, queue))

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        """The live bindings of ``exchange``, whichever process declared them."""
        return self._run(lambda: self.bindings.table(exchange))

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False,
                     **kwargs: Any) -> None:
        """Delete ``queue``: its messages and its bindings, whoever declared them."""
        if if_empty and self._size(queue):
            return
        state = self.state
        state.queue_bindings_delete(queue)
        state.expiry.pop(queue, None)
        state.auto_delete.discard(queue)
        self._delete(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._run(lambda: self.bindings.drop(queue))

    # -- routing --------------------------------------------------------------------------------

    def _put_fanout(self, exchange: str, message: Raw, routing_key: str, **kwargs: Any) -> None:
        """One copy of the message for each queue bound to ``exchange``, in one statement."""
        payload, priority = self._payload(message), self._get_message_priority(message)
        notify = self.notifies
        self._run(lambda: self.bindings.route(exchange, None, payload, priority, notify))

    def _put_direct(self, exchange: str, routing_key: str, message: Raw) -> None:
        payload, priority = self._payload(message), self._get_message_priority(message)
        notify = self.notifies
        routed = self._run(lambda: self.bindings.route(exchange, routing_key, payload, priority,
                                                       notify))
        if not routed and exchange == routing_key:
            # The project's layout (exchange, queue and routing key of one name) arrives even
            # before any process bound the queue; other unrouted messages are dropped, as on AMQP.
            self._put(routing_key, message)

    def _lookup(self, exchange: str, routing_key: str, default: str | None = None) -> Any:
        # Topic exchanges and restores; the same fallback as _put_direct.
        queues = super()._lookup(exchange, routing_key, default)
        if not queues and exchange == routing_key and self.typeof(exchange).type == "direct":
            return [routing_key]
        return queues

    # -- consumers and expiry ---------------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        """Consume from ``queue``; while this process does, an expiring queue stays alive."""
        state = self.state
        state.consumed[queue] += 1
        if queue in state.expiry:
            state.refresh_at = 0.0
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> None:
        """Stop consuming; an ``auto_delete`` queue goes with its last consumer."""
        queue = self._tag_to_queue.get(consumer_tag)
        known = consumer_tag in self._consumers
        super().basic_cancel(consumer_tag)
        if queue is None or not known:
            return
        state = self.state
        state.consumed[queue] -= 1
        if state.consumed[queue] > 0:
            return
        del state.consumed[queue]
        if queue in state.auto_delete:
            try:
                self.queue_delete(queue)
            except DatabaseError as exc:  # it expires, or stays for the next declaration
                logger.warning("django:// broker could not delete queue %s: %s", queue, exc)

    def _polled_lazily(self, queues: list[str]) -> bool:
        """Whether ``queues`` are all remote control's (declared to expire when unused): a
        connection is drained once per task delivered, and asking such a channel as often
        would add a query to each; once per polling interval answers commands soon enough."""
        expiry = self.state.expiry
        return all(queue in expiry for queue in queues)

    def keep_queues_alive(self) -> None:
        """Push forward the deadlines of the expiring queues this process consumes (a third of
        their ``x-expires`` ahead), and now and then sweep the expired queues of every process."""
        state = self.state
        now = time.monotonic()
        if now >= state.refresh_at:
            rows: list[tuple[Binding, Expiry | None]] = []
            every = math.inf
            for queue in list(state.consumed):  # a copy: other threads' channels share it
                expiry = state.expiry.get(queue)
                if expiry is None or expiry.expires is None:
                    continue
                every = min(every, expiry.expires / 3)
                # Re-creating the rows, not only updating them: a sweep may have taken them
                # while this process could not reach the database.
                rows.append((("", queue, "", queue), expiry))
                for bound in list(state.queue_index.get(queue, ())):
                    exchange, key = bound.exchange, bound.routing_key
                    pattern = self.typeof(exchange).prepare_bind(
                        queue, exchange, key, state.bindings.get(bound))[1]
                    rows.append(((exchange, key, pattern or "", queue), expiry))
            state.refresh_at = now + every
            if rows:
                try:
                    self._run(lambda: self.bindings.bind(rows))
                except DatabaseError as exc:
                    logger.warning("django:// broker could not keep its queues alive: %s", exc)
        self._maybe_sweep(now)

    def _maybe_sweep(self, now: float) -> None:
        state = self.state
        if now < state.sweep_at.get(self.database, 0.0):
            return
        state.sweep_at[self.database] = now + SWEEP_INTERVAL
        try:
            removed = self._run(self.bindings.sweep)
        except DatabaseError as exc:  # harmless: the next sweep tries again
            logger.debug("django:// broker could not sweep expired queues: %s", exc)
        else:
            if removed:
                logger.debug("django:// broker removed %d expired message(s)", removed)
