"""Fault-injection fixtures: the end-to-end ``Project`` with the ledger app, and the report.

Each test gets a :class:`Harness`: the example project (``tests/e2e/conftest.py``) on one broker,
its workers started with ``DJANGO_SETTINGS_MODULE=tests.fault.settings`` so that they also run
``tests.fault.ledgerapp.tasks.work``, which writes to a ledger file of the test's own. A scenario
sends tasks, injects its fault, waits until everything has settled and then counts, from the
ledger, what was sent, finished, lost and run twice. Every count becomes a row of the report,
printed at the end of the run and written as Markdown to ``$FAULT_REPORT`` (else to pytest's
temporary directory).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from ..e2e import conftest as e2e
from ..e2e.conftest import STOP_TIMEOUT, MakeProject, Project, Worker
from . import ledger

# The end-to-end suite's fixtures, registered for this directory too.
make_project = e2e.make_project
sqlite_template = e2e.sqlite_template
pg_template = e2e.pg_template

BROKERS = ("redis", "amqp", "django-sqlite", "django-pg")
SETTINGS = "tests.fault.settings"
# The report's order (each test names its scenario when it concludes).
SCENARIOS = ("child SIGKILL", "worker SIGKILL", "warm shutdown", "cold shutdown",
             "broker restart", "broker restart, default options", "database outage")

# Short leases, so that a dead worker's messages come back within seconds rather than minutes.
SHORT_LEASES = {
    "redis": {"visibility_timeout": 2, "unacked_restore_interval": 0.5,
              "unacked_restore_throttle": 1},
    "django-sqlite": {"visibility_timeout": 2},
    "django-pg": {"visibility_timeout": 2},
}

SETTLE_TIMEOUT = 40.0  # seconds for every sent task to finish once the fault is over

_REPORT = pytest.StashKey[list[ledger.Tally]]()
_REPORT_PATH = pytest.StashKey[Path]()

COLUMNS = ("scenario", "broker", "sent", "finished", "lost", "duplicated starts",
           "duplicated finishes", "recovery s", "note")


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """``predicate()`` once it is truthy, or its last (falsy) value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def redis_unacked(url: str, queue: str) -> int:
    """Messages of ``queue`` delivered and not yet acknowledged, in kombu's ``unacked`` hash."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        count = 0
        for _tag, payload in client.hscan_iter("unacked"):
            _message, _exchange, routing_key = json.loads(payload)
            count += routing_key == queue
        return count
    finally:
        client.close()


class Harness:
    """One scenario on one broker: a project, its ledger, and the counting at the end."""

    def __init__(self, project: Project, report: list[ledger.Tally]) -> None:
        self.project = project
        self.broker = project.broker
        self.report = report
        self.ledger_path = project.tmp / "ledger.log"
        project.extra_env.update({"DJANGO_SETTINGS_MODULE": SETTINGS,
                                  ledger.ENV: str(self.ledger_path)})

    def short_leases(self) -> None:
        """Workers started from now on lease messages for two seconds (Redis, django://)."""
        options = SHORT_LEASES.get(self.broker)
        if options:
            self.project.extra_env["TASKS_Q_BROKER_OPTIONS"] = json.dumps(options)

    def worker(self, concurrency: int = 2, ready: bool = True) -> Worker:
        """A prefork worker on the project's queue."""
        return self.project.worker(concurrency=concurrency, ready=ready)

    def send(self, count: int, seconds: float) -> list[str]:
        """Publish ``count`` ledger tasks of ``seconds`` each; their ids, in order."""
        return [self.project.send(ledger.WORK, n, seconds) for n in range(count)]

    # -- the ledger -----------------------------------------------------------------------
    def records(self) -> list[ledger.Record]:
        """The ledger so far."""
        return ledger.read(self.ledger_path)

    def wait_finished(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` distinct tasks have finished."""
        if not poll(lambda: len(ledger.finished(self.records())) >= count, timeout):
            raise AssertionError(f"fewer than {count} tasks finished within {timeout}s:\n"
                                 f"{self.project.logs()}")

    def running_child(self, worker: Worker, max_age: float | None = None,
                      timeout: float = 10.0) -> ledger.Record:
        """The start record of a task running now in a pool child of ``worker``.

        With ``max_age``, only a run started at most that many seconds ago: one that is sure
        to be still running a moment later, when the test hits it.
        """
        def find() -> ledger.Record | None:
            children = {p.pid for p in psutil.Process(worker.pid).children()}
            oldest = time.time() - max_age if max_age is not None else 0.0
            candidates = [r for r in ledger.running(self.records())
                          if r.pid in children and r.at >= oldest]
            return max(candidates, key=lambda r: r.at) if candidates else None

        found = poll(find, timeout)
        if found is None:
            raise AssertionError(f"no task running in a child of {worker.hostname}:\n"
                                 f"{self.project.logs()}")
        assert found.pid != worker.pid, "the task ran in the worker's main process"
        return found

    # -- settling and counting ------------------------------------------------------------
    def held(self) -> int:
        """Messages of the queue the broker still holds (Redis: the unacked ones too)."""
        count = self.project.count()
        if self.project.broker_url.startswith("redis"):
            count += redis_unacked(self.project.broker_url, self.project.queue)
        return count

    def settle(self, ids: list[str], timeout: float = SETTLE_TIMEOUT) -> bool:
        """Wait until every id finished and the broker holds nothing for the queue."""
        wanted = set(ids)
        if not poll(lambda: wanted <= ledger.finished(self.records()), timeout, 0.1):
            return False
        # A finish can come before its ack; a redelivery of a finished task can come after it.
        return bool(poll(lambda: self.held() == 0, 10.0, 0.2))

    def stop_workers(self) -> None:
        """Warm-stop every live worker: after that none holds a message unacknowledged."""
        live = [w for w in self.project.workers if w.proc.poll() is None]
        for w in live:
            if not w.terminated:
                w.signal(signal.SIGTERM)
        for w in live:
            w.wait_exit(STOP_TIMEOUT)

    def abandon(self, scenario: str, ids: list[str], note: str) -> None:
        """Report a scenario that cannot settle (its worker died): what finished until now."""
        self.report.append(ledger.tally(scenario, self.broker, ids, self.records(), note=note))

    def conclude(self, scenario: str, ids: list[str], fault_at: float | None = None,
                 until: set[str] | None = None,
                 timeout: float = SETTLE_TIMEOUT) -> ledger.Tally:
        """Settle, stop the workers, count, add the row to the report; checks common to all.

        Asserts that nothing is lost (unfinished ``timeout`` seconds from now) or left in the
        broker and that the result rows agree with the ledger; each scenario asserts its own
        duplicate guarantees.
        """
        settled = self.settle(ids, timeout)
        self.stop_workers()
        records = self.records()
        unfinished = len(set(ids) - ledger.finished(records))
        note = f"not finished {timeout:g}s after the fault was over" if unfinished else ""
        row = ledger.tally(scenario, self.broker, ids, records, fault_at, until, note)
        self.report.append(row)
        logs = self.project.logs()
        assert row.unexpected == 0, f"the ledger names {row.unexpected} task(s) never sent"
        assert row.lost == 0, f"{row.lost} of {row.sent} task(s) lost:\n{logs}"
        assert settled, f"the broker still holds {self.held()} message(s):\n{logs}"
        assert self.held() == 0, f"left in the broker after the workers stopped:\n{logs}"
        rows = {r["task_id"]: r for r in self.project.results(ids)}
        not_success = {i: rows.get(i, {}).get("status") for i in ids
                       if rows.get(i, {}).get("status") != "SUCCESS"}
        assert not not_success, f"result rows that are not SUCCESS: {not_success}\n{logs}"
        return row


@pytest.fixture(scope="session")
def fault_report(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> list[ledger.Tally]:
    """The session's report rows (printed and written by ``pytest_terminal_summary``)."""
    config = request.config
    if _REPORT not in config.stash:
        config.stash[_REPORT] = []
        default = tmp_path_factory.getbasetemp() / "fault-report.md"
        config.stash[_REPORT_PATH] = Path(os.environ.get("FAULT_REPORT") or default)
    return config.stash[_REPORT]


@pytest.fixture(params=BROKERS)
def fault(request: pytest.FixtureRequest, make_project: MakeProject,
          fault_report: list[ledger.Tally]) -> Harness:
    """A :class:`Harness` on each broker in turn (narrow it with ``indirect`` parametrize)."""
    return Harness(make_project(request.param), fault_report)


def _order(row: ledger.Tally) -> tuple[int, int]:
    def index(names: tuple[str, ...], name: str) -> int:
        return names.index(name) if name in names else len(names)

    return index(SCENARIOS, row.scenario), index(BROKERS, row.broker)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[ledger.Tally]) -> str:
    """The report as a Markdown table, one row per scenario and broker."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(rows, key=_order):
        cells = (r.scenario, r.broker, r.sent, r.finished, r.lost, r.dup_starts,
                 r.dup_finishes, r.recovery, r.note)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    """Print the fault-injection report and write it as Markdown."""
    rows = config.stash.get(_REPORT, None)
    if not rows:
        return
    table = markdown_table(rows)
    path = config.stash[_REPORT_PATH]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Fault injection: delivery report\n\n" + table + "\n"
                    "Recovery: seconds from the fault to the last finish it waited for "
                    "(child kill: the killed task's finish; otherwise every task's).\n")
    terminalreporter.section("fault injection: delivery report")
    terminalreporter.write(table)
    terminalreporter.write_line(f"(written to {path})")
