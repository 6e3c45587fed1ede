"""The worker's result writer: success rows written in batches, on its own thread.

Each test runs on the fast suite's database (SQLite: Django's ``bulk_create``) and again, marked
for the integration pass, on PostgreSQL (``COPY`` through the session's batch table)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, OperationalError, connection
from kombu.asynchronous import Hub

from django_tasks_q.message import TaskMessage
from django_tasks_q.models import TaskResult
from django_tasks_q.registry import DJANGO_TASK_HEADER
from django_tasks_q.worker import writer as writer_module
from django_tasks_q.worker.writer import ResultWriter, store_success

pytestmark = pytest.mark.django_db(transaction=True)

STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Done:
    msg: TaskMessage
    unstored: tuple[str, datetime] | None


def done(result: Any = None, task_id: str | None = None, **fields: Any) -> Done:
    msg = TaskMessage(id=task_id or str(uuid.uuid4()), name="tests.tasks.multiply",
                      args=[1, "two"], kwargs={"three": [3]}, queue="default", **fields)
    return Done(msg, (json.dumps(result, cls=DjangoJSONEncoder), STARTED))


@pytest.fixture(params=[
    pytest.param(False, id="default-db"),
    pytest.param(True, id="postgres", marks=[pytest.mark.broker, pytest.mark.postgres]),
])
def database(request: pytest.FixtureRequest) -> str:
    """The fast suite's database; and, in the integration pass, PostgreSQL (required)."""
    if request.param:
        request.getfixturevalue("postgres")
    return connection.vendor


def test_a_batch_is_written_with_every_column(database: str) -> None:
    first = done({"at": datetime(2026, 5, 6, tzinfo=UTC), "n": 1}, priority=3, retries=2)
    child = done([1, 2], root_id=first.msg.id, parent_id=first.msg.id, group="g1")
    store_success([first, child, Done(done().msg, None)], "w1")
    rows = {r.task_id: r for r in TaskResult.objects.all()}
    assert set(rows) == {first.msg.id, child.msg.id}  # the one without a row is not written
    row = rows[first.msg.id]
    assert (row.status, row.task_name, row.worker, row.queue) == (
        "SUCCESS", "tests.tasks.multiply", "w1", "default")
    assert (row.args, row.kwargs) == ([1, "two"], {"three": [3]})
    assert row.result == {"at": "2026-05-06T00:00:00Z", "n": 1}
    assert (row.retries, row.priority, row.traceback) == (2, 3, "")
    assert row.date_started == STARTED and row.date_done is not None
    assert (row.root_id, row.parent_id, row.group_id) == (first.msg.id, "", "")
    other = rows[child.msg.id]
    assert (other.result, other.root_id, other.parent_id, other.group_id) == (
        [1, 2], first.msg.id, first.msg.id, "g1")


def test_a_row_the_task_has_already_is_brought_up_to_date(database: str) -> None:
    before = TaskResult.objects.create(task_id="t-1", task_name="tests.tasks.multiply",
                                       status="STARTED", worker="w0", retries=0,
                                       date_created=datetime(2026, 1, 1, tzinfo=UTC))
    store_success([done(42, task_id="t-1", retries=1)], "w1")
    row = TaskResult.objects.get(task_id="t-1")
    assert row.pk == before.pk and row.date_created == before.date_created
    assert (row.status, row.result, row.worker, row.retries) == ("SUCCESS", 42, "w1", 1)


def test_a_task_twice_in_one_batch_is_written_once_with_its_last_run(database: str) -> None:
    store_success([done(1, task_id="twice"), done(2, task_id="twice")], "w1")
    assert list(TaskResult.objects.values_list("task_id", "result")) == [("twice", 2)]


def test_each_batch_writes_only_its_own_rows(database: str) -> None:
    store_success([done(1, task_id="a")], "w1")
    first = TaskResult.objects.get(task_id="a").date_done
    time.sleep(0.01)
    store_success([done(2, task_id="b")], "w1")  # the same session, its batch table reused
    assert TaskResult.objects.get(task_id="a").date_done == first
    assert TaskResult.objects.count() == 2


def on_postgres(test: Callable[..., None]) -> Callable[..., None]:
    """Marks ``test`` for the integration pass, on PostgreSQL (required)."""
    for mark in (pytest.mark.broker, pytest.mark.postgres, pytest.mark.usefixtures("postgres")):
        test = mark(test)
    return test


def run_hub(hub: Hub, until: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = hub.create_loop()
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the writer did not report"
        next(loop)


def test_the_thread_reports_each_batch_on_the_loop(database: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[tuple[list[Done], DatabaseError | None]] = []
    writer = ResultWriter("w1", lambda batch, error: reports.append((batch, error)))
    real, calls = writer_module.store_success, []

    def failing_once(batch: list[Done], hostname: str) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise OperationalError("the database went away")
        real(batch, hostname)

    monkeypatch.setattr(writer_module, "store_success", failing_once)
    hub = Hub()
    writer.register(hub)
    try:
        batch = [done(1), done(2)]
        writer.submit(batch)
        assert writer.busy
        run_hub(hub, lambda: bool(reports))
        assert reports[0][0] is batch and isinstance(reports[0][1], OperationalError)
        assert not writer.busy and TaskResult.objects.count() == 0
        writer.submit(batch)  # its connection was reset: the next batch is written
        run_hub(hub, lambda: len(reports) == 2)
        assert reports[1] == (batch, None)
        assert TaskResult.objects.count() == 2
    finally:
        writer.stop()
        hub.close()


def test_waiting_reports_the_batch_being_written(database: str) -> None:
    reports: list[Any] = []
    writer = ResultWriter("w1", lambda batch, error: reports.append((batch, error)))
    hub = Hub()
    writer.register(hub)
    try:
        writer.submit([done(1)])
        writer.wait()  # shutdown: no loop turns
        assert len(reports) == 1 and reports[0][1] is None and not writer.busy
        assert TaskResult.objects.count() == 1
    finally:
        writer.stop()
        hub.close()


@on_postgres
def test_stored_outcomes_maintain_no_pattern_index_on_postgres() -> None:
    # Ids are looked up whole: a varchar_pattern_ops index on them would only cost writes.
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s",
                       [TaskResult._meta.db_table])
        indexes = [row[0] for row in cursor.fetchall()]
    assert any("(task_id)" in index and "UNIQUE" in index for index in indexes)
    assert any("(root_id)" in index for index in indexes)
    assert not [index for index in indexes if "pattern_ops" in index]


@on_postgres
@pytest.mark.parametrize("django_task", [False, True], ids=["ours", "django-task"])
def test_rows_are_copied_into_the_table_unless_a_task_has_one_already(
        django_task: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A django.tasks task stores a row as it starts: its batch goes through the batch table,
    # without a copy into the table that would meet that row first.
    into: list[str] = []
    real = writer_module._copy

    def copy(table: str, rows: list[Any], *sql: str) -> None:
        into.append(table.split()[0])
        real(table, rows, *sql)

    monkeypatch.setattr(writer_module, "_copy", copy)

    def row(result: int, **fields: Any) -> Done:
        made = done(result, **fields)
        if django_task:
            made.msg.headers[DJANGO_TASK_HEADER] = "default"
        return made

    first = row(7)
    store_success([first, row(8)], "w1")
    table = connection.ops.quote_name(TaskResult._meta.db_table)
    assert into == [writer_module.BATCH_TABLE if django_task else table]
    assert sorted(TaskResult.objects.values_list("result", flat=True)) == [7, 8]
    into.clear()
    store_success([row(9, task_id=first.msg.id), row(10)], "w1")  # one has its row already
    assert into == ([writer_module.BATCH_TABLE] if django_task
                    else [table, writer_module.BATCH_TABLE])
    assert sorted(TaskResult.objects.values_list("result", flat=True)) == [8, 9, 10]


@on_postgres
def test_a_connection_lost_during_the_copy_gives_the_batch_back(postgres_url: str) -> None:
    # The copy runs on the driver's cursor: its errors are Django's, and an outage is told to
    # the loop (the tasks are given back), not taken for rows the database refused.
    writer = ResultWriter("w1", lambda batch, error: None)
    store_success([done(1)], "w1")  # this thread's connection, open
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    import psycopg  # the integration pass's driver

    with psycopg.connect(postgres_url, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    assert isinstance(writer.write([done(2)]), OperationalError)
    assert TaskResult.objects.count() == 1  # reconnected; the batch waits to be written again


@on_postgres
def test_rows_the_database_refuses_are_logged_and_not_given_back(
        caplog: pytest.LogCaptureFixture) -> None:
    # A name longer than its column: running the task again would be refused again.
    long = done(1, task_id="too-long")
    long.msg.name = "tests.tasks." + "x" * 300
    writer = ResultWriter("w1", lambda batch, error: None)
    with caplog.at_level(logging.ERROR, "django_tasks_q.worker"):
        assert writer.write([long]) is None
    assert "too-long" in caplog.text and "acknowledged without them" in caplog.text
    assert writer.write([done(2, task_id="fine")]) is None  # the connection is still good
    assert list(TaskResult.objects.values_list("task_id", flat=True)) == ["fine"]


def test_a_batch_that_is_not_json_is_logged_and_the_thread_goes_on(
        database: str, caplog: pytest.LogCaptureFixture) -> None:
    # A message accepted as pickle can carry arguments that a row cannot hold.
    bad = done(1, task_id="not-json")
    bad.msg.args = [object()]
    reports: list[Any] = []
    writer = ResultWriter("w1", lambda batch, error: reports.append(error))
    hub = Hub()
    writer.register(hub)
    try:
        with caplog.at_level(logging.ERROR, "django_tasks_q.worker"):
            writer.submit([bad])
            run_hub(hub, lambda: len(reports) == 1)
        # Acknowledged (no error to give it back for): it would fail the same way again.
        assert reports == [None]
        assert "not-json" in caplog.text and "acknowledged without them" in caplog.text
        writer.submit([done(2, task_id="fine")])
        run_hub(hub, lambda: len(reports) == 2)
        assert list(TaskResult.objects.values_list("task_id", flat=True)) == ["fine"]
    finally:
        writer.stop()
        hub.close()


def test_a_fork_waits_for_the_batch_being_written(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pool child forked in the middle of a write would inherit the driver's locks held by the
    # writer's thread (SQLite's) and hang at its first query.
    writing, finish = threading.Event(), threading.Event()

    def slow_store(batch: Any, hostname: str) -> None:
        writing.set()
        finish.wait(10)

    monkeypatch.setattr(writer_module, "store_success", slow_store)
    reports: list[Any] = []
    writer = ResultWriter("w1", lambda batch, error: reports.append(error))
    hub = Hub()
    writer.register(hub)
    forked: list[float] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0)
        forked.append(time.monotonic())
        os.waitpid(pid, 0)

    try:
        writer.submit([done(1)])
        assert writing.wait(5)
        forker = threading.Thread(target=fork)
        forker.start()
        time.sleep(0.3)
        assert not forked  # still waiting for the batch
        finished = time.monotonic()
        finish.set()
        forker.join(5)
        assert forked and forked[0] >= finished
        run_hub(hub, lambda: reports == [None])
    finally:
        finish.set()
        writer.stop()
        hub.close()
