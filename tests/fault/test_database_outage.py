"""Fault injection: the database goes away while the worker stores outcomes.

The broker (Redis) stays up; the result store, a PostgreSQL database of the test's own, refuses
every connection for a few seconds while tasks finish. An outcome that cannot be stored must not
be acknowledged: the message goes back, the task runs again once the database is back, and in
the end every task has its one result row. Nothing is lost; what finished during the outage
runs twice (at-least-once), and the worker itself stays up throughout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest

from ..conftest import require
from ..e2e.conftest import MakeProject
from . import ledger
from .conftest import Harness

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.broker]

OUTAGE = 4.0  # seconds the database refuses connections


@contextmanager
def database_down(database_url: str) -> Iterator[None]:
    """Refuse new connections to the database and end the open ones; allow them again after."""
    import psycopg

    name = urlparse(database_url).path.lstrip("/")
    with psycopg.connect(require("postgres"), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", [name])
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_database_outage_while_storing_loses_no_outcome(
        make_project: MakeProject, fault_report: list[ledger.Tally]) -> None:
    fault = Harness(make_project("redis", database="pg"), fault_report)
    worker = fault.worker(concurrency=2)
    ids = fault.send(12, 0.5)
    fault.wait_finished(2)

    down_at = time.time()
    with database_down(fault.project.database_url):
        time.sleep(OUTAGE)
    assert worker.proc.poll() is None, f"the worker died in the outage:\n{worker.log}"

    row = fault.conclude("database outage", ids, down_at)
    # The runs that finished while nothing could be stored were given back and ran again.
    assert row.dup_finishes >= 1, fault.project.logs()
    # Failures are stored by the pool child, successes by the worker with others'.
    assert worker.count(r"outcome could not be stored \(OperationalError: .*\); giving it back"
                        r"|Could not store the results of \d+ finished task\(s\) "
                        r"\(OperationalError: .*\); giving them back") >= 1, worker.log
    # One row per task, however many times it ran.
    rows = fault.project.results(ids)
    assert sorted(r["task_id"] for r in rows) == sorted(ids)
    # The outage is announced once, not once a second.
    assert worker.count(r"Could not read revoked tasks") <= 1, worker.log
    assert worker.count(r"The database is reachable again") == 1, worker.log
