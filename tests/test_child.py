"""Pool children and the database connections they inherit across fork."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time

import pytest
from django.db import connection

from django_tasks_q import message
from django_tasks_q.worker import child

from . import tasks

pytestmark = [pytest.mark.django_db(transaction=True)]


def _fork(run_in_child: str) -> int:
    """Fork; in the child drop inherited connections, then query; return the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            child.drop_inherited_db_connections()
            if run_in_child == "query":
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    code = 0 if cursor.fetchone() == (1,) else 2
            else:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.broker
@pytest.mark.postgres
def test_child_leaves_the_parents_postgresql_session_intact() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL on PostgreSQL")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (parent_backend,) = cursor.fetchone()
    assert _fork("query") == 0  # the child opened a session of its own and used it
    assert _fork("nothing") == 0  # and one that only dropped the inherited one
    with connection.cursor() as cursor:  # the parent's session survived both children
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone() == (parent_backend,)


def test_child_opens_its_own_sqlite_connection() -> None:
    if connection.vendor != "sqlite":
        pytest.skip("the PostgreSQL variant runs in the PostgreSQL pass")
    connection.ensure_connection()
    inherited = connection.connection
    assert _fork("query") == 0
    assert connection.connection is inherited
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


def test_a_child_checks_connections_before_a_job_only_after_waiting() -> None:
    # After every job, and before one that comes more than RECHECK_AFTER after the last.
    ours, theirs = multiprocessing.Pipe()
    counts_r, counts_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        checks = 0

        def counting() -> None:
            nonlocal checks
            checks += 1

        try:
            child.close_old_connections = counting  # type: ignore[assignment]
            child.main(theirs, "h", max_tasks=3)
            os.write(counts_w, str(checks).encode())
        finally:
            os._exit(0)
    outcomes = []
    for pause in (0.0, 0.0, child.RECHECK_AFTER + 0.3):
        time.sleep(pause)
        msg = message.TaskMessage(id=message.new_id(), name=tasks.multiply.name,
                                  args=[2, 3], kwargs={}, queue="q")
        ours.send_bytes(pickle.dumps(msg))
        outcomes.append(pickle.loads(ours.recv_bytes()))
    os.waitpid(pid, 0)
    assert [o.status for o in outcomes] == ["SUCCESS"] * 3, outcomes[0].error
    # first job: before and after; second, at once: after; third, after a wait: both
    assert os.read(counts_r, 16) == b"5"
