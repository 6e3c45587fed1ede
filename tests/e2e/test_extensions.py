"""End-to-end: worker extensions in real ``taskworker`` processes: the example project's order
feed (a kombu consumer on the worker's connection) and long-task watchdog (the timer), their
command-line options, a reconnect, and the order and failures of start and stop steps."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from .conftest import MakeProject, Project, Worker, tasks_q_extra, wait_for
from .tcpproxy import TcpProxy

pytestmark = pytest.mark.e2e

ORDER_FEED = "testproject.testapp.extensions.OrderFeed"
STEPS = "tests.e2e.extensions"
REPORT_PID = "testproject.testapp.tasks.report_pid"
BROKERS = [pytest.param("redis", marks=pytest.mark.broker),
           pytest.param("amqp", marks=pytest.mark.broker), "django-sqlite"]


def run_extensions(project: Project, *paths: str) -> None:
    """Have the project's workers run the worker extensions ``paths`` (and, as always, those
    the example app registers)."""
    project.extra_env["TASKS_Q_EXTRA"] = tasks_q_extra(WORKER_EXTENSIONS=list(paths))


#: Makes a project on a broker whose workers run the order feed; gives it and its orders queue.
MakeFeed = Callable[[str], tuple[Project, str]]


@pytest.fixture
def make_feed(make_project: MakeProject) -> Iterator[MakeFeed]:
    """Projects whose workers run the order feed, each on a queue of its own (``ext-orders-…``,
    after the project's queue), deleted at the end once their workers have stopped."""
    projects: list[Project] = []

    def make(broker: str) -> tuple[Project, str]:
        project = make_project(broker)
        projects.append(project)
        run_extensions(project, ORDER_FEED)
        return project, order_queue_of(project)

    yield make
    for project in projects:
        for worker in project.workers:
            worker.stop()
        project.producer.call("order_queue", queue=order_queue_of(project), delete=True)


def order_queue_of(project: Project) -> str:
    return f"ext-orders-{project.queue}"


def order(email: str, *lines: tuple[str, int, str]) -> dict[str, Any]:
    return {"email": email, "lines": [{"description": d, "quantity": q, "unit_price": p}
                                      for d, q, p in lines]}


def wait_order_total(project: Project, email: str, worker: Worker) -> dict[str, Any]:
    """The one order of ``email`` once the task the feed sent has set its total."""
    def totalled() -> dict[str, Any] | None:
        rows = project.producer.call("orders", email=email)
        return rows[0] if rows and Decimal(rows[0]["total"]) > 0 else None

    return wait_for(totalled, 20, f"the order of {email} with its total", lambda: worker.log)


@pytest.mark.parametrize("broker", BROKERS)
def test_the_order_feed_takes_json_orders_acknowledges_them_and_survives_a_bad_one(
        broker: str, make_feed: MakeFeed) -> None:
    project, queue = make_feed(broker)
    # The option the extension declares reaches its constructor: it consumes this queue.
    worker = project.worker("--orders-queue", queue)
    assert worker.count(rf"OrderFeed: taking orders from queue {queue}\b") == 1

    # Through the library's helper (the app's producer pool).
    first = project.producer.call("publish_order", queue=queue, body=order(
        "ann@example.com", ("kettle", 2, "12.50"), ("mug", 4, "3.25")))
    worker.wait_log(rf"OrderFeed: message {first} is order #\d+ for ann@example.com")

    # A message its handler fails on: logged with its id and rejected; the worker goes on.
    bad = project.producer.call("publish_order", queue=queue, body={"lines": []})
    worker.wait_log(rf"Worker extension {ORDER_FEED}: message {bad} \(exchange 'shop', "
                    rf"routing key '{queue}'\): its handler raised; rejected")
    assert "KeyError: 'email'" in worker.log  # the traceback follows the line

    # Through a plain kombu producer, on the exchange and routing key the extension binds.
    plain = f"storefront-{uuid.uuid4().hex[:8]}"
    project.producer.call("publish_plain", exchange="shop", routing_key=queue,
                          body=order("bob@example.com", ("teapot", 1, "30.00")),
                          message_id=plain)
    worker.wait_log(rf"OrderFeed: message {plain} is order #\d+ for bob@example.com")

    # Each order's total was set by the task the handler sent to the worker's own queue.
    ann = wait_order_total(project, "ann@example.com", worker)
    assert (Decimal(ann["total"]), ann["lines"]) == (Decimal("38.00"), ["kettle", "mug"])
    assert Decimal(wait_order_total(project, "bob@example.com", worker)["total"]) == 30
    assert project.producer.call("orders", email="") == []  # the bad one left no order behind

    assert worker.stop() == 0
    # Acknowledged or rejected, none comes back once the worker's connection is closed.
    assert project.producer.call("order_queue", queue=queue) == 0


@pytest.mark.parametrize("broker", BROKERS)
def test_the_watchdog_warns_once_about_a_task_running_past_its_threshold(
        broker: str, make_project: MakeProject) -> None:
    project = make_project(broker)
    # LongTaskWatchdog is registered by the example app's ready(), not by the setting.
    run_extensions(project)
    worker = project.worker("--watchdog-after", "1", "--watchdog-every", "0.25")
    slow = project.send(REPORT_PID, 3)
    quick = project.send(REPORT_PID, 0)
    worker.wait_log(rf"Task {REPORT_PID}\[{slow}\] has been running for [12]s \(since "
                    rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00\), longer than 1s")
    project.wait_results([slow, quick])
    assert worker.count(r"has been running for") == 1  # once per task, never the quick one
    assert worker.stop() == 0


@pytest.mark.parametrize("broker", [pytest.param("redis", marks=pytest.mark.broker),
                                    pytest.param("amqp", marks=pytest.mark.broker)])
def test_the_order_feed_consumes_again_after_the_connection_is_cut(
        broker: str, make_feed: MakeFeed) -> None:
    project, queue = make_feed(broker)
    project.producer  # noqa: B018 - the test's side talks to the broker directly
    direct = project.broker_url
    proxy = TcpProxy(direct)
    try:
        project.broker_url = proxy.url(direct)  # the worker's, alone, goes through the proxy
        worker = project.worker("--orders-queue", queue)
        project.broker_url = direct
        first = project.producer.call("publish_order", queue=queue,
                                      body=order("cy@example.com", ("lamp", 1, "20.00")))
        worker.wait_log(rf"OrderFeed: message {first} is order #\d+ for cy@example.com")

        proxy.drop()
        worker.wait_log(r"Reconnected to", timeout=20)
        worker.wait_log(rf"OrderFeed: taking orders from queue {queue}\b", count=2)
        second = project.producer.call("publish_order", queue=queue,
                                       body=order("di@example.com", ("desk", 1, "99.00")))
        worker.wait_log(rf"OrderFeed: message {second} is order #\d+ for di@example.com",
                        timeout=20)
        assert Decimal(wait_order_total(project, "di@example.com", worker)["total"]) == 99
        assert worker.stop() == 0
    finally:
        proxy.close()
    assert project.producer.call("order_queue", queue=queue) == 0


def positions(log: str, *lines: str) -> list[int]:
    """Where each of ``lines`` first appears in ``log`` (each must)."""
    found = [log.find(line) for line in lines]
    missing = [line for line, at in zip(lines, found, strict=True) if at < 0]
    assert not missing, f"missing {missing}:\n{log}"
    return found


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGQUIT], ids=["warm", "cold"])
def test_steps_start_in_order_and_stop_in_reverse_at_shutdown(
        broker: str, how: signal.Signals, make_project: MakeProject) -> None:
    project = make_project(broker)
    run_extensions(project, f"{STEPS}.First", f"{STEPS}.Second")
    worker = project.worker()
    worker.signal(how)
    assert worker.wait_exit(20) == 0
    log = worker.log
    at = positions(log, "step First start: ", "step Second start: ", " ready: pool=",
                   "step Second stop: 0 running", "step First stop: 0 running",
                   f"{worker.hostname} stopped")
    assert at == sorted(at), log
    # Started after the pool (two children), before the worker consumed.
    assert f"step First start: {worker.hostname}, 2 pool process(es), 0 running" in log


@pytest.mark.parametrize("broker", BROKERS)
def test_a_step_that_fails_to_start_stops_the_worker_with_a_clear_message(
        broker: str, make_project: MakeProject) -> None:
    project = make_project(broker)
    run_extensions(project, f"{STEPS}.First", f"{STEPS}.FailsToStart", f"{STEPS}.Second")
    worker = project.worker(ready=False)
    assert worker.wait_exit(30) == 1
    log = worker.log
    assert ("CommandError: Worker extension tests.e2e.extensions.FailsToStart failed to start: "
            "RuntimeError: cannot reach the licence server; the worker stopped") in log
    at = positions(log, "step First start: ", "Worker extension tests.e2e.extensions."
                   "FailsToStart failed to start", "step First stop: ")
    assert at == sorted(at), log
    assert "step Second" not in log
    assert " ready: pool=" not in log
