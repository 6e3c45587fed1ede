"""Fault injection: the broker restarted under a working worker (a private Redis, RabbitMQ).

The worker must resume by itself: one "Lost the connection" and one "Reconnected" line per
outage, no task lost (the broker persists its messages), the broker password in no log. Leases
are short (two seconds) as in the worker-kill scenario; a second Redis test keeps the default
options and asks that the stream still resumes within seconds.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import in_ci, require
from ..e2e.conftest import wait_for
from ..e2e.test_worker import PrivateRedis
from . import ledger
from .conftest import Harness, MakeProject

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.broker]

OUTAGE = 1.5  # seconds the broker stays down: several reconnect attempts fail meanwhile
RABBITMQCTL_TIMEOUT = 60.0


class PersistentRedis(PrivateRedis):
    """A private, password-protected redis-server that keeps every write across a restart."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", self.password, "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.tmp),
             "--logfile", str(self.tmp / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._accepting, 10, f"redis-server on port {self.port}")

    def restart(self) -> None:
        """Stop the server, keep it down for ``OUTAGE`` seconds, start it on the same port."""
        self.stop()
        time.sleep(OUTAGE)
        self.start()

    def _accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
        except OSError:
            return False
        return True


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    """A running :class:`PersistentRedis`, stopped after the test."""
    server = PersistentRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True,
                   timeout=RABBITMQCTL_TIMEOUT)


@pytest.fixture
def rabbitmq_restart() -> Iterator[Callable[[float], None]]:
    """``restart(seconds)``: stop the shared RabbitMQ's app, wait, start it; always left running."""
    require("amqp")
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not installed: the RabbitMQ restart test needs it"
        if in_ci():
            pytest.fail(message + " (CI=true)")
        pytest.skip(message)
    stopped = False

    def restart(seconds: float) -> None:
        nonlocal stopped
        stopped = True
        _rabbitmqctl("stop_app")
        time.sleep(seconds)
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
        stopped = False

    try:
        yield restart
    finally:
        if stopped:  # a failed restart must not leave the shared broker down
            _rabbitmqctl("start_app")
            _rabbitmqctl("await_startup")


def _run_through_outage(fault: Harness, restart: Callable[[], None], password: str,
                        scenario: str = "broker restart", short_leases: bool = True,
                        timeout: float | None = None) -> None:
    if short_leases:
        fault.short_leases()  # what was in flight at the outage comes back within seconds
    worker = fault.worker(ready=False)
    ids = fault.send(40, 0.2)
    worker.wait_ready()
    fault.wait_finished(6)

    down_at = time.time()
    restart()
    fault.project.producer.call("reconnect")  # the test's own connection died too
    try:
        worker.wait_log(r"Reconnected to ", timeout=30)
    except AssertionError:
        fault.abandon(scenario, ids, f"worker exited ({worker.proc.poll()}) "
                      f"instead of reconnecting")
        raise

    fault.conclude(scenario, ids, down_at, **({} if timeout is None else {"timeout": timeout}))
    for log in (worker.log, fault.project.producer.log_path.read_text(errors="replace")):
        assert password not in log
    assert worker.count(r"Lost the connection to ") == 1, worker.log
    assert worker.count(r"Reconnected to ") == 1, worker.log


def test_redis_restart_mid_stream(persistent_redis: PersistentRedis, make_project: MakeProject,
                                  fault_report: list[ledger.Tally]) -> None:
    fault = Harness(make_project("redis", url=persistent_redis.url), fault_report)
    _run_through_outage(fault, persistent_redis.restart, persistent_redis.password)


def test_redis_restart_with_default_options_resumes_within_seconds(
        persistent_redis: PersistentRedis, make_project: MakeProject,
        fault_report: list[ledger.Tally]) -> None:
    fault = Harness(make_project("redis", url=persistent_redis.url), fault_report)
    _run_through_outage(fault, persistent_redis.restart, persistent_redis.password,
                        "broker restart, default options", short_leases=False, timeout=15)


@pytest.mark.parametrize("fault", ["amqp"], indirect=True)
def test_rabbitmq_restart_mid_stream(fault: Harness,
                                     rabbitmq_restart: Callable[[float], None]) -> None:
    _run_through_outage(fault, lambda: rabbitmq_restart(OUTAGE), ":guest@")
