"""Adapters: the ``django://`` broker's wake-ups on PostgreSQL (NOTIFY on publish, LISTEN to wait).

Every statement that makes a message ready (a publish, a message given back) also notifies the
channel of its queue, so the notification is sent when, and only if, that transaction commits.
A consuming transport keeps one psycopg connection of its own that LISTENs on the channels of
its queues: an idle channel then rests on that socket instead of polling the table, and polls
only every ``safety_poll_interval`` for what no notification announces (leases that ran out,
notifications missed while the listener reconnected). When the listener is lost, channels poll
every ``polling_interval`` again until it is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import selectors
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.db import connections

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("django_tasks_q.transport.django")

#: The channel of the queue in SQL column or parameter ``{}``; the same name as ``channel()``.
CHANNEL_SQL = "'dtq_' || encode(sha224(convert_to({}, 'UTF8')), 'hex')"

#: Insert one message and notify its queue, in one statement (one transaction: the caller's).
PUT = """
WITH m AS (
    INSERT INTO {table} (queue, payload, priority, visible_at, claimed_by, deliveries)
    VALUES (%s, %s, %s, %s, '', 0) RETURNING queue
)
SELECT pg_notify(%s, '') FROM m
"""

#: Make claimed rows (id, deliveries) visible at once and notify each of their queues.
REQUEUE = f"""
WITH back AS (
    UPDATE {{table}} AS m SET visible_at = %s, claimed_by = '', deliveries = m.deliveries - %s
    FROM unnest(%s::bigint[], %s::integer[]) AS s(id, n)
    WHERE m.id = s.id AND m.deliveries = s.n
    RETURNING m.queue
)
SELECT pg_notify(name, '') FROM (SELECT DISTINCT {CHANNEL_SQL.format("queue")} AS name
                                 FROM back) AS c
"""


def route_and_notify(route: str) -> str:
    """``route`` (an ``INSERT … SELECT`` of messages) returning one row per notified queue."""
    return (f"WITH routed AS ({route.rstrip()} RETURNING queue)\n"
            f"SELECT pg_notify({CHANNEL_SQL.format('queue')}, '') FROM routed")


@lru_cache(maxsize=1024)
def channel(queue: str) -> str:
    """The NOTIFY channel of ``queue``: a hash, so that any queue name makes a valid identifier
    within PostgreSQL's 63 bytes."""
    return "dtq_" + hashlib.sha224(queue.encode()).hexdigest()


def available(database: str) -> bool:
    """Whether ``database`` is PostgreSQL through psycopg 3, which the listener needs."""
    if connections[database].vendor != "postgresql":
        return False
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return bool(is_psycopg3)


#: Seconds before the first attempt to get a lost listener back, doubled up to RETRY_MAX.
RETRY_MIN = 1.0
RETRY_MAX = 30.0


class Listener:
    """A dedicated connection LISTENing on queues' channels; tells ``on_notify`` which queues
    were published to (None: the connection was lost, anything may have been missed)."""

    def __init__(self, database: str, on_notify: Callable[[set[str] | None], None]) -> None:
        self.database = database
        self.on_notify = on_notify
        self.heard = 0  # notifications received, for tests and debugging
        self.conn: psycopg.Connection[Any] | None = None
        self._queues: dict[str, str] = {}  # channel -> queue: wanted, whether connected or not
        self._listened: set[str] = set()  # channels LISTENed on the current connection
        self._pending: set[str] = set()  # queues notified, not yet passed on
        self._loop: Any = None  # kombu hub: the socket is one of its readers
        self._on_readable: Callable[[], None] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._retry_at = 0.0
        self._retry_in = RETRY_MIN
        self._failing = False  # a failure was logged; the next success says so

    @property
    def connected(self) -> bool:
        """Whether notifications can arrive now."""
        return self.conn is not None

    def attach(self, loop: Any, on_readable: Callable[[], None]) -> None:
        """Have event loop ``loop`` call ``on_readable`` when notifications wait on the socket."""
        self._loop, self._on_readable = loop, on_readable
        if self.conn is not None:
            loop.add_reader(self.conn.fileno(), on_readable)

    def listening(self, queues: Iterable[str]) -> bool:
        """Whether a publish to any of ``queues`` already reaches this listener. LISTENs on the
        channels missing (connecting first, if it is time to try); those are not counted yet,
        since a message published just before may have been missed."""
        missing = []
        for queue in queues:
            name = channel(queue)
            self._queues[name] = queue
            if name not in self._listened:
                missing.append(name)
        if self.conn is not None and not missing:
            return True
        if self.conn is None and time.monotonic() >= self._retry_at:
            self._connect()
        if self.conn is not None:
            self._listen(list(self._queues.keys() - self._listened))
        return False

    def read(self) -> None:
        """Take the notifications waiting on the socket and pass their queues on."""
        conn = self.conn
        if conn is None:
            return
        from psycopg import Error, pq

        try:
            # libpq's socket is non-blocking: this reads what has arrived, never waits.
            conn.pgconn.consume_input()
            while (notify := conn.pgconn.notifies()) is not None:
                self._heard(notify.relname.decode())
            if conn.pgconn.status != pq.ConnStatus.OK:
                raise OSError("the connection is closed")
        except (Error, OSError) as exc:
            self._lost(exc)
            return
        self._flush()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, waking as soon as a notification arrives (without
        an event loop; with one, the loop watches the socket)."""
        if self.conn is None or self._selector is None:
            time.sleep(timeout)
        elif self._selector.select(timeout):
            self.read()

    def close(self) -> None:
        """Close the connection (a listener may connect again when asked to listen)."""
        conn, self.conn = self.conn, None
        self._listened.clear()
        if conn is None:
            return
        fd = -1
        with contextlib.suppress(Exception):
            fd = conn.fileno()
        if self._loop is not None and fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(fd)
        if self._selector is not None:
            with contextlib.suppress(Exception):
                self._selector.close()
            self._selector = None
        with contextlib.suppress(Exception):
            conn.close()

    # -- internals --------------------------------------------------------------------------

    def _connect(self) -> None:
        import psycopg

        db = connections[self.database]
        # Django's parameters for this database, but a connection of our own, outside any pool
        # and autocommitting: LISTEN takes effect at once and no transaction stays open.
        params = db.get_connection_params()
        for key in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(key, None)
        params.setdefault("connect_timeout", 5)
        try:
            conn = psycopg.connect(**params, autocommit=True)
        except (psycopg.Error, OSError) as exc:
            self._failed(exc)
            return
        conn.add_notify_handler(lambda notify: self._heard(notify.channel))
        self.conn = conn
        self._selector = selectors.DefaultSelector()
        self._selector.register(conn.fileno(), selectors.EVENT_READ)
        if self._loop is not None and self._on_readable is not None:
            self._loop.add_reader(conn.fileno(), self._on_readable)

    def _listen(self, names: list[str]) -> None:
        if not names or self.conn is None:
            return
        from psycopg import Error, sql

        try:
            statement = sql.SQL("; ").join(
                sql.SQL("LISTEN {}").format(sql.Identifier(name)) for name in names)
            self.conn.execute(statement)
        except (Error, OSError) as exc:
            self._lost(exc)
            return
        self._listened.update(names)
        if self._failing:
            logger.info("django:// broker: listening for new messages again")
            self._failing = False
        self._retry_in = RETRY_MIN
        self._flush()  # notifications that arrived with the reply

    def _heard(self, name: str) -> None:
        self.heard += 1
        queue = self._queues.get(name)
        if queue is not None:
            self._pending.add(queue)

    def _flush(self) -> None:
        if self._pending:
            queues, self._pending = self._pending, set()
            self.on_notify(queues)

    def _lost(self, exc: Exception) -> None:
        self.close()
        self._failed(exc)
        self._pending.clear()
        self.on_notify(None)  # anything may have been missed: every channel polls

    def _failed(self, exc: Exception) -> None:
        # Once per outage; the message names the server, never the password.
        level = logging.DEBUG if self._failing else logging.WARNING
        logger.log(level, "django:// broker: no LISTEN connection (%s: %s); polling every "
                   "polling_interval until it is back", type(exc).__name__,
                   str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        self._failing = True
        self._retry_at = time.monotonic() + self._retry_in
        self._retry_in = min(self._retry_in * 2, RETRY_MAX)
