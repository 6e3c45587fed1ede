"""End-to-end: ``manage.py taskworker`` processes run the example project's tasks on brokers."""

from __future__ import annotations

import base64
import pickle
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from ..conftest import in_ci
from .conftest import MakeProject, Project, wait_for

pytestmark = pytest.mark.e2e

TASKS = "testproject.testapp.tasks"
ADD = f"{TASKS}.add"
STOP = 10  # seconds a worker may take to exit after SIGTERM


def when(value: str | None) -> datetime:
    assert value, "timestamp missing"
    return datetime.fromisoformat(value)


# -- outcomes -------------------------------------------------------------------------------

def test_success_and_failure_rows(project: Project) -> None:
    """A kept success, a success that keeps nothing (RESULTS=errors) and a full failure row."""
    worker = project.worker()
    good = project.create_order("alice@example.com")
    declined = project.create_order("bob@declined.example")
    add_id = project.send(ADD, 2, 3)
    paid_id = project.send(f"{TASKS}.charge_payment", good)
    fail_id = project.send(f"{TASKS}.charge_payment", declined)

    rows = project.wait_results([add_id, fail_id])
    worker.wait_log(rf"charge_payment\[{paid_id}\] succeeded")

    added = rows[add_id]
    assert (added["status"], added["result"], added["args"]) == ("SUCCESS", 5, [2, 3])
    # charge_payment keeps failures only: its success leaves the order paid and no row behind.
    assert project.order(good)["status"] == "paid"
    assert project.results([paid_id]) == []

    failed = rows[fail_id]
    assert failed["status"] == "FAILURE"
    assert failed["task_name"] == f"{TASKS}.charge_payment"
    assert failed["result"]["exc_type"] == "PaymentDeclined"
    assert failed["result"]["exc_module"] == TASKS
    assert f"card declined for order {declined}" in failed["result"]["exc_message"]
    assert "Traceback (most recent call last)" in failed["traceback"]
    assert "in charge_payment" in failed["traceback"]
    assert "PaymentDeclined: card declined" in failed["traceback"]
    assert (failed["args"], failed["kwargs"]) == ([declined], {})
    assert (failed["queue"], failed["worker"], failed["retries"]) == (
        project.queue, worker.hostname, 0)
    assert when(failed["date_created"]) <= when(failed["date_done"])
    assert when(failed["date_started"]) <= when(failed["date_done"])
    assert project.order(declined)["status"] == "new"
    assert worker.count(rf"charge_payment\[{fail_id}\] failed: PaymentDeclined") == 1


def test_autoretry_backoff_keeps_one_row_with_retries_counted(project: Project) -> None:
    """sync_to_warehouse fails twice (backoff 1 s, 2 s), then succeeds: one row, retries=2."""
    worker = project.worker()
    order = project.create_order("carol@example.com")
    started = time.monotonic()
    task_id = project.send(f"{TASKS}.sync_to_warehouse", order)

    row = project.wait_results([task_id], timeout=30)[task_id]
    elapsed = time.monotonic() - started

    assert row["status"] == "SUCCESS"
    assert row["result"] == {"order_id": order, "attempts": 3}
    assert row["retries"] == 2
    assert len(project.results(name=f"{TASKS}.sync_to_warehouse")) == 1
    assert elapsed >= 3.0 - 0.1, f"the retries did not wait out their backoff ({elapsed:.2f}s)"
    assert worker.count(rf"sync_to_warehouse\[{task_id}\] retry 1 in 1\.0s") == 1
    assert worker.count(rf"sync_to_warehouse\[{task_id}\] retry 2 in 2\.0s") == 1
    project.assert_empty()


def test_autoretry_exhausted_ends_in_one_failure_row(project: Project) -> None:
    """send_receipt's ConnectionError on its last allowed attempt: one FAILURE row, no retry.

    The message arrives as retry number 5 (send_receipt's max_retries), as the fifth retry
    would: the example project has no task whose full backoff (jittered, up to 16 s) is short.
    """
    worker = project.worker()
    order = project.create_order("down@example.com")
    task_id = project.send_message(f"{TASKS}.send_receipt", [order], retries=5)

    row = project.wait_results([task_id])[task_id]

    assert row["status"] == "FAILURE"
    assert row["result"]["exc_type"] == "ConnectionRefusedError"
    assert row["retries"] == 5
    assert "mail server refused the connection" in row["traceback"]
    assert len(project.results(name=f"{TASKS}.send_receipt")) == 1
    assert worker.count(r"send_receipt\[.*\] retry") == 0
    assert project.order(order)["receipt_sent_at"] is None
    project.assert_empty()


# -- bad input ------------------------------------------------------------------------------

def test_unknown_task_is_a_failure_row_and_the_worker_goes_on(project: Project) -> None:
    worker = project.worker()
    name = f"{TASKS}.no_such_task"
    unknown = project.send(name, 1, flag=True)

    row = project.wait_results([unknown])[unknown]

    assert (row["status"], row["task_name"]) == ("FAILURE", name)
    assert row["result"]["exc_type"] == "TaskNotRegistered"
    assert name in row["result"]["exc_message"]
    assert (row["args"], row["kwargs"], row["queue"]) == ([1], {"flag": True}, project.queue)
    assert worker.count(rf"{name}\[{unknown}\] refused: .*not registered") == 1

    after = project.send(ADD, 20, 22)
    assert project.wait_results([after])[after]["result"] == 42


def test_undecodable_and_pickle_messages_are_dropped_once(project: Project) -> None:
    """Each is logged once with its id and removed from the queue; the worker keeps working."""
    worker = project.worker()
    garbage_id, pickled_id = str(uuid.uuid4()), str(uuid.uuid4())
    project.producer.call(
        "raw", queue=project.queue, body_b64=base64.b64encode(b'[[2, 3], {}, {"chain": ').decode(),
        content_type="application/json", content_encoding="utf-8",
        headers={"task": ADD, "id": garbage_id, "lang": "py"}, correlation_id=garbage_id)
    # A pickle that would run code if it were loaded: it must never be.
    payload = pickle.dumps(([2, 3], {}, {}), protocol=2)
    project.producer.call(
        "raw", queue=project.queue, body_b64=base64.b64encode(payload).decode(),
        content_type="application/x-python-serialize", content_encoding="binary",
        headers={"task": ADD, "id": pickled_id, "lang": "py"}, correlation_id=pickled_id)
    after = project.send(ADD, 1, 1)

    assert project.wait_results([after])[after]["result"] == 2
    worker.wait_log(rf"Dropped message {garbage_id}\b")
    worker.wait_log(rf"Dropped message {pickled_id}\b")
    assert worker.stop() == 0
    assert worker.count(rf"Dropped message {garbage_id}\b") == 1
    assert worker.count(rf"Dropped message {pickled_id}\b.*x-python-serialize") == 1
    assert project.results([garbage_id, pickled_id]) == []
    # Stopped, the worker holds nothing unacknowledged: what is left is truly left.
    project.assert_empty()


# -- scheduling and shutdown ----------------------------------------------------------------

def test_fair_dispatch_short_tasks_do_not_wait_behind_a_long_one(project: Project) -> None:
    worker = project.worker(concurrency=2)
    slow = project.create_order("slow-1.5@example.com")
    slow_id = project.send(f"{TASKS}.send_receipt", slow)
    worker.wait_log(r"e2e-mail: sending to slow-1\.5@")
    quick = [project.send(ADD, i, i) for i in range(4)]

    rows = project.wait_results(quick, timeout=10)
    done_slow = wait_for(lambda: project.order(slow)["receipt_sent_at"], 10,
                         "the slow receipt", project.logs)

    assert sorted(r["result"] for r in rows.values()) == [0, 2, 4, 6]
    last_quick = max(when(r["date_done"]) for r in rows.values())
    assert last_quick < when(done_slow), (
        "a short task waited for the long one to finish:\n" + project.logs())
    worker.wait_log(rf"send_receipt\[{slow_id}\] succeeded")


def test_sigterm_finishes_the_running_task_and_gives_the_rest_back(project: Project) -> None:
    worker = project.worker(concurrency=1)
    slow = project.create_order("slow-1.5@example.com")
    slow_id = project.send(f"{TASKS}.send_receipt", slow)
    worker.wait_log(r"e2e-mail: sending to slow-1\.5@")
    waiting = [project.send(ADD, i, 1) for i in range(3)]
    time.sleep(0.3)  # let the worker reserve them (prefetch 4) before it is told to stop

    worker.signal(signal.SIGTERM)
    worker.wait_log(r"Warm shutdown \(SIGTERM\)")
    assert worker.wait_exit(STOP) == 0

    log = worker.log
    assert log.index("Warm shutdown") < log.index("e2e-mail: sent to slow-1.5@")
    assert f"send_receipt[{slow_id}] succeeded" in log
    assert project.order(slow)["receipt_sent_at"] is not None
    assert project.results(waiting) == []
    assert project.count() == len(waiting)


def test_threads_and_solo_pools_run_tasks(project: Project) -> None:
    threads_queue, solo_queue = f"{project.queue}-threads", f"{project.queue}-solo"
    workers = {
        "threads": project.worker(pool="threads", concurrency=2, queues=[threads_queue],
                                  ready=False),
        "solo": project.worker(pool="solo", queues=[solo_queue], ready=False),
    }
    declined = project.create_order("dave@declined.example")
    sent: dict[str, tuple[list[str], str]] = {}
    for pool, queue in (("threads", threads_queue), ("solo", solo_queue)):
        workers[pool].wait_ready()
        ids = [project.send(ADD, i, 10, queue=queue) for i in range(3)]
        sent[pool] = ids, project.send(f"{TASKS}.charge_payment", declined, queue=queue)

    for pool, (ids, fail_id) in sent.items():
        rows = project.wait_results([*ids, fail_id])
        worker = workers[pool]
        assert [rows[i]["result"] for i in ids] == [10, 11, 12], pool
        assert rows[fail_id]["result"]["exc_type"] == "PaymentDeclined", pool
        assert {r["worker"] for r in rows.values()} == {worker.hostname}, pool
        assert f"pool={pool}" in worker.log
    for worker in workers.values():
        worker.signal(signal.SIGTERM)
    assert [w.wait_exit(STOP) for w in workers.values()] == [0, 0]


# -- outages and sharing --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, with a password, that can be stopped and restarted."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed: the outage test needs a private one"
            if in_ci():
                pytest.fail(message + " (CI=true)")
            pytest.skip(message)
        self.binary = binary
        self.tmp = tmp
        self.port = _free_port()
        self.password = f"pw-{uuid.uuid4().hex}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", self.password, "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp), "--logfile", str(self.tmp / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                return False
            return True

        wait_for(accepting, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.broker
def test_worker_reconnects_after_a_redis_restart(private_redis: PrivateRedis,
                                                 make_project: MakeProject) -> None:
    project = make_project("redis", url=private_redis.url)
    worker = project.worker()
    before = project.send(ADD, 1, 2)
    assert project.wait_results([before])[before]["result"] == 3

    private_redis.stop()
    worker.wait_log(r"Lost the connection to redis://")
    time.sleep(1.5)  # a real outage: reconnect attempts fail for a while
    private_redis.start()
    worker.wait_log(r"Reconnected to redis://", timeout=15)

    project.producer.call("reconnect")
    after = [project.send(ADD, i, 100) for i in range(3)]
    rows = project.wait_results(after)
    assert sorted(r["result"] for r in rows.values()) == [100, 101, 102]
    assert worker.proc.poll() is None

    log = worker.log
    assert private_redis.password not in log
    assert private_redis.password not in project.producer.log_path.read_text()
    assert worker.count(r"Lost the connection to ") == 1
    assert worker.count(r"Reconnected to ") == 1


@pytest.mark.broker
def test_one_log_line_per_redis_outage(private_redis: PrivateRedis,
                                       make_project: MakeProject) -> None:
    project = make_project("redis", url=private_redis.url)
    worker = project.worker()

    private_redis.stop()
    worker.wait_log(r"Lost the connection to redis://")
    time.sleep(1.5)  # long enough for several reconnect attempts to fail
    private_redis.start()
    worker.wait_log(r"Reconnected to redis://", timeout=15)

    outage = worker.log.split("Lost the connection", 1)[1].split("Reconnected", 1)[0]
    # [1:-1]: the rest of the "Lost" line and the start of the "Reconnected" line are not between.
    between = outage.splitlines()[1:-1]
    noisy = [line for line in between if "WARNING" in line or "ERROR" in line]
    assert noisy == []


@pytest.mark.broker
def test_sigterm_during_an_outage_stops_the_worker(private_redis: PrivateRedis,
                                                   make_project: MakeProject) -> None:
    project = make_project("redis", url=private_redis.url)
    worker = project.worker(concurrency=1)

    private_redis.stop()
    worker.wait_log(r"Lost the connection to redis://")
    worker.signal(signal.SIGTERM)
    worker.wait_log(r"Warm shutdown \(SIGTERM\)")

    try:
        assert worker.wait_exit(3) == 0
    finally:
        worker.signal(signal.SIGQUIT)  # a cold shutdown ends it either way


@pytest.mark.broker
@pytest.mark.parametrize("project", ["django-pg"], indirect=True)
def test_two_workers_share_a_postgres_queue_without_running_a_task_twice(
        project: Project) -> None:
    first = project.worker("--prefetch-multiplier", "1", concurrency=2, ready=False)
    second = project.worker("--prefetch-multiplier", "1", concurrency=2).wait_ready()
    first.wait_ready()
    ids = [project.send(ADD, i, i) for i in range(24)]

    rows = project.wait_results(ids, timeout=30)

    assert sorted(r["result"] for r in rows.values()) == [2 * i for i in range(24)]
    assert {r["worker"] for r in rows.values()} == {first.hostname, second.hostname}
    first.signal(signal.SIGTERM)
    second.signal(signal.SIGTERM)
    assert (first.wait_exit(STOP), second.wait_exit(STOP)) == (0, 0)
    runs = first.log + second.log
    for task_id in ids:
        assert runs.count(f"add[{task_id}] succeeded") == 1, f"{task_id} ran twice:\n{runs}"
    project.assert_empty()
