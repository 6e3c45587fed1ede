"""Processes: the worker's result writer: stores success rows on a thread of its own.

With ``RESULTS = "all"`` every finished task has a row to write before its message is
acknowledged. Written on the consumer's loop, each batch would stop dispatching for the
database's round trip; here the loop hands a batch over and goes on, and is told through a pipe
it watches once the batch is written (or could not be). One batch is written at a time: what
finishes meanwhile gathers in the consumer and goes in the next, so a slower database gets
larger batches rather than a queue of small ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from django.db import DatabaseError, DataError, IntegrityError, connection, transaction
from django.utils import timezone

from .. import execute
from ..message import TaskMessage
from ..models import TaskResult, TaskState
from ..registry import is_django_task

logger = logging.getLogger("django_tasks_q.worker")


class Finished(Protocol):
    """What the writer needs of a finished task: its message and its unstored outcome."""

    @property
    def msg(self) -> TaskMessage: ...

    @property
    def unstored(self) -> tuple[str, datetime] | None: ...


#: The columns of a success row, in the order ``success_row`` gives them.
COLUMNS = ("task_id", "task_name", "status", "args", "kwargs", "result", "traceback", "worker",
           "queue", "root_id", "parent_id", "group_id", "retries", "priority", "date_created",
           "date_started", "date_done")
#: The table, private to each database session, that a batch is copied into first.
BATCH_TABLE = "dtq_result_batch"

#: Held while a batch is written, and taken by every fork of this process: a pool child forked
#: in the middle of a write would inherit the database driver's locks held (SQLite's, for one)
#: and hang at its first query. A fork waits for the batch being written instead.
_WRITING = threading.Lock()
os.register_at_fork(before=_WRITING.acquire, after_in_parent=_WRITING.release,
                    after_in_child=_WRITING.release)


def success_row(msg: TaskMessage, unstored: tuple[str, datetime], hostname: str,
                now: datetime) -> tuple[Any, ...]:
    """The values of ``msg``'s success row, in the order of ``COLUMNS`` (JSON as text)."""
    result, started = unstored
    return (msg.id, msg.name, TaskState.SUCCESS.value, json.dumps(msg.args),
            json.dumps(msg.kwargs), result, "", hostname, msg.queue, msg.root_id or msg.id,
            msg.parent_id or "", msg.group or "", msg.retries, msg.priority, now, started, now)


def store_success(done: Sequence[Finished], hostname: str) -> None:
    """Write the success rows of those in ``done`` that have one, in one transaction: a row a
    task has already (its start's, or a retry's) is brought up to date."""
    # By task id: a message delivered twice may be in one batch twice; its last run counts.
    latest = {f.msg.id: (f.msg, f.unstored) for f in done if f.unstored is not None}
    if not latest:
        return
    now = timezone.now()
    if connection.vendor == "postgresql":
        from django.db.backends.postgresql.psycopg_any import is_psycopg3  # needs a driver

        if is_psycopg3:
            # A django.tasks task stored a row as it started: to be brought up to date.
            fresh = not any(is_django_task(msg.headers) for msg, _ in latest.values())
            _copy_rows([success_row(msg, unstored, hostname, now)
                        for msg, unstored in latest.values()], fresh)
            return
    execute.store_rows([execute.result_row(msg, TaskState.SUCCESS, result=json.loads(result),
                                           worker=hostname, date_started=started, now=now)
                        for msg, (result, started) in latest.values()])


def _copy_rows(rows: list[tuple[Any, ...]], fresh: bool) -> None:
    """PostgreSQL: ``COPY`` the rows into the table, a fraction of the work of binding every
    value of a multi-row ``INSERT``. Where a task may have a row already (``fresh`` is false,
    or the copy meets one), they are copied into the session's batch table instead and
    inserted from there, each row a task has already brought up to date."""
    quote = connection.ops.quote_name
    table = quote(TaskResult._meta.db_table)
    columns = ", ".join(map(quote, COLUMNS))
    if fresh:
        try:
            _copy(f"{table} ({columns})", rows)
            return
        except IntegrityError:  # one of them has a row (its message came again): as below
            pass
    updated = ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in execute.UPDATED_ON_CONFLICT)
    # Kept, empty, by the session between batches; made again wherever it is missing (a new
    # connection, or a pooler's other session).
    _copy(f"{BATCH_TABLE} ({columns})", rows,
          f"CREATE TEMPORARY TABLE IF NOT EXISTS {BATCH_TABLE} ON COMMIT DELETE ROWS AS "
          f"SELECT {columns} FROM {table} WITH NO DATA",
          f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {BATCH_TABLE} "
          f"ON CONFLICT ({quote('task_id')}) DO UPDATE SET {updated}")


def _copy(into: str, rows: list[tuple[Any, ...]], before: str = "", after: str = "") -> None:
    """``COPY`` ``rows`` into ``into`` (a table and its columns) in one transaction, between
    the statements ``before`` and ``after``; the driver's errors as Django's."""
    with transaction.atomic(), connection.cursor() as cursor, connection.wrap_database_errors:
        if before:
            cursor.execute(before)
        with cursor.copy(f"COPY {into} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        if after:
            cursor.execute(after)


class ResultWriter:
    """Writes batches with ``store_success`` on a thread; ``on_written(batch, error)`` runs on
    the loop that ``register`` attached it to, ``error`` being the ``DatabaseError`` that kept
    the batch from being stored, or ``None``."""

    def __init__(self, hostname: str,
                 on_written: Callable[[list[Any], DatabaseError | None], None]) -> None:
        self.hostname = hostname
        self.on_written = on_written
        self.writing: list[Any] | None = None  # the batch on the thread now
        self._todo: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[DatabaseError | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # (read, write) ends of the pipe to the loop

    @property
    def busy(self) -> bool:
        return self.writing is not None

    def register(self, hub: Any) -> None:
        """Attach to the consumer's event loop (a new one after every reconnect)."""
        if self._wake is None:
            self._wake = os.pipe()
            os.set_blocking(self._wake[0], False)
        hub.add_reader(self._wake[0], self._on_wake, self._wake[0])

    def submit(self, batch: list[Any]) -> None:
        """Write ``batch`` on the thread; the loop hears of it through ``on_written``."""
        assert self.writing is None, "one batch at a time"
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
            self._thread.start()
        self.writing = batch
        self._todo.put(batch)

    def wait(self) -> None:
        """Block until the batch on the thread is written, and report it (shutdown)."""
        if self.writing is not None:
            self._report(self._done.get())

    def stop(self) -> None:
        """End the thread once its batch is written. A batch not reported by then is not
        acknowledged: the broker hands its messages out again."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
            self.writing, self._done = None, queue.SimpleQueue()
        wake, self._wake = self._wake, None
        for fd in wake or ():
            os.close(fd)

    def write(self, batch: list[Any]) -> DatabaseError | None:
        """Write ``batch`` here and now (on the thread; on the loop at shutdown); the error
        that kept it from the database, if any."""
        try:
            with _WRITING:
                store_success(batch, self.hostname)
        except Exception as exc:
            if isinstance(exc, DatabaseError) and not isinstance(exc, DataError | IntegrityError):
                with _WRITING, contextlib.suppress(Exception):
                    connection.close()  # this thread's: the next batch reconnects
                return exc
            # Rows the database refuses (a value too long for its column), or not the
            # database's doing: running the tasks again would end the same way.
            logger.exception("Could not write the result rows of %d task(s) (%s); their "
                             "messages are acknowledged without them", len(batch),
                             ", ".join(f.msg.id for f in batch))
        return None

    def _run(self) -> None:
        try:
            while (batch := self._todo.get()) is not None:
                self._done.put(self.write(batch))
                assert self._wake is not None  # registered before the first batch
                os.write(self._wake[1], b"w")
        finally:
            with _WRITING:
                connection.close()

    def _on_wake(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 64)
        while self.writing is not None:
            try:
                error = self._done.get_nowait()
            except queue.Empty:
                return
            self._report(error)

    def _report(self, error: DatabaseError | None) -> None:
        batch, self.writing = self.writing, None
        assert batch is not None
        self.on_written(batch, error)
