"""Pool children and the database connections they inherit across fork."""

from __future__ import annotations

import os

import pytest
from django.db import connection

from django_tasks_q.worker import child

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
