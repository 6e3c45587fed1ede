"""Events (``-E``) as Celery's own receiver reads them, from a worker on Redis and RabbitMQ."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from django_tasks_q import AsyncResult, broker, execute
from django_tasks_q.worker.main import Worker, WorkerOptions

from . import tasks
from .conftest import require
from .running import run_consumer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.broker]

HOSTNAME = "events@tests"


@pytest.fixture(params=["redis", "amqp"])
def queue(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """A queue of its own on Redis or RabbitMQ, the configured broker."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else require("amqp")
    name = f"events-{uuid.uuid4().hex[:8]}"
    settings.TASKS_Q = {"BROKER_URL": url, "QUEUES": [name]}
    yield name
    broker.publisher().close()
    with broker.connection() as conn, contextlib.suppress(Exception):  # best-effort cleanup
        broker.queue(name)(conn.default_channel).delete()


class Monitor:
    """Celery's ``EventReceiver`` on a thread of its own: every event, and how it came."""

    def __init__(self, url: str) -> None:
        from celery import Celery
        from celery.events import EventReceiver

        self.app = Celery("events-monitor", broker=url)
        self.events: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        self.deliveries: list[tuple[str, dict[str, Any], int | None]] = []
        monitor = self

        class Receiver(EventReceiver):
            def _receive(self, body: Any, message: Any, **kwargs: Any) -> None:
                key = message.delivery_info.get("routing_key")
                if key != "probe.listening":
                    monitor.deliveries.append((key, dict(message.headers or {}),
                                               message.properties.get("delivery_mode")))
                super()._receive(body, message, **kwargs)

        def record(event: dict[str, Any]) -> None:
            (self.probes if event["type"] == "probe-listening" else self.events).append(event)

        self.connection = self.app.connection_for_read()
        self.receiver = Receiver(self.connection, handlers={"*": record}, app=self.app)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._wait_listening()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the connection closes under it at the end
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _wait_listening(self) -> None:
        # A Redis subscription starts with the consumer's first poll: probe until one arrives.
        with self.app.events.default_dispatcher(hostname="probe@tests") as dispatcher:
            def probe() -> bool:
                dispatcher.send("probe-listening")
                return bool(self.probes)

            self.wait(probe, "the monitor to receive a probe event", interval=0.2)

    def of(self, prefix: str, uuid: str | None = None) -> list[dict[str, Any]]:
        """Events whose type starts with ``prefix`` (of task ``uuid``), in order."""
        return [e for e in list(self.events) if e["type"].startswith(prefix)
                and (uuid is None or e.get("uuid") == uuid)]

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 15.0,
             interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events}")
            time.sleep(interval)
        return value

    def close(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(5)
        self.connection.release()
        self.app.close()


@pytest.fixture
def monitor(queue: str) -> Iterator[Monitor]:
    from django_tasks_q import conf

    mon = Monitor(conf.get().BROKER_URL)
    yield mon
    mon.close()


def worker_for(queue: str, events: bool, pool: str = "solo") -> Worker:
    worker = Worker(WorkerOptions(queues=[queue], concurrency=1, pool=pool, hostname=HOSTNAME,
                                  events=events))
    assert worker.consumer.events is not None
    assert worker.consumer.events in worker.consumer.watchers
    worker.consumer.events.interval = 0.3  # heartbeats within the test's time
    return worker


def run(worker: Worker, expected: int, on_done: Callable[[int], None] | None = None) -> None:
    """Run ``worker``'s consumer until ``expected`` outcomes, then close its watchers as
    ``Worker.run`` does at shutdown."""
    consumer = worker.consumer
    if on_done is not None:
        settle, count = consumer.on_done, iter(range(1, expected + 1))

        def done(job: Any, outcome: execute.Outcome) -> None:
            settle(job, outcome)
            on_done(next(count))

        consumer.on_done = done  # type: ignore[method-assign]
    assert len(run_consumer(consumer, expected, timeout=30)) == expected
    for watcher in consumer.watchers:
        watcher.close()


def test_a_task_s_way_through_the_worker_in_celery_s_events(queue: str, monitor: Monitor
                                                              ) -> None:
    past = timezone.now() - timedelta(minutes=1)
    revoked = tasks.multiply.apply_async(args=(1, 1), queue=queue)
    AsyncResult(revoked.id).revoke()
    ok = tasks.multiply.apply_async(args=(3, 4), queue=queue)
    failed = tasks.boom.apply_async(args=("it broke",), queue=queue)
    retried = tasks.retries_then_ok.apply_async(args=(1,), queue=queue)
    expired = tasks.multiply.apply_async(args=(5, 6), queue=queue, expires=past)
    worker = worker_for(queue, events=True)

    # ok, failed, retried (twice: the retry, then the success), expired; revoked never runs.
    run(worker, 5)
    monitor.wait(lambda: monitor.of("worker-offline"), "worker-offline")

    events = list(monitor.events)
    assert events[0]["type"] == "worker-online"
    assert events[-1]["type"] == "worker-offline"
    for event in events:
        assert (event["hostname"], event["pid"]) == (HOSTNAME, os.getpid())
        assert isinstance(event["timestamp"], float)
        assert isinstance(event["utcoffset"], (int, float))
    # The logical clock orders them as they happened (on RabbitMQ, worker-online can be made
    # after the first tasks' events, which then wait for it in the buffer).
    clocks = [event["clock"] for event in events if event["type"].startswith("task-")]
    assert clocks == sorted(clocks) and len({e["clock"] for e in events}) == len(events)

    def types(task_id: str) -> list[str]:
        return [e["type"] for e in monitor.of("task-", task_id)]

    assert types(ok.id) == ["task-received", "task-started", "task-succeeded"]
    received, _, succeeded = monitor.of("task-", ok.id)
    assert (received["name"], received["args"], received["kwargs"]) == (
        "tests.tasks.multiply", "[3, 4]", "{}")
    assert (received["retries"], received["eta"], received["expires"]) == (0, None, None)
    assert received["root_id"] == ok.id and received["parent_id"] is None
    assert succeeded["result"] == "12" and 0 <= succeeded["runtime"] < 5

    assert types(failed.id) == ["task-received", "task-started", "task-failed"]
    failure = monitor.of("task-failed", failed.id)[0]
    assert failure["exception"] == "ValueError('it broke')"
    assert "raise ValueError(message)" in failure["traceback"]

    assert types(retried.id) == ["task-received", "task-started", "task-retried",
                                 "task-received", "task-started", "task-succeeded"]
    retry = monitor.of("task-retried", retried.id)[0]
    assert retry["exception"].startswith("Retry(") and "self.retry" in retry["traceback"]
    assert [e["retries"] for e in monitor.of("task-received", retried.id)] == [0, 1]
    assert monitor.of("task-succeeded", retried.id)[0]["result"] == "1"

    assert types(revoked.id) == ["task-received", "task-revoked"]
    assert {k: monitor.of("task-revoked", revoked.id)[0][k]
            for k in ("terminated", "signum", "expired")} == {
        "terminated": False, "signum": None, "expired": False}
    assert types(expired.id) == ["task-received", "task-started", "task-revoked"]
    assert monitor.of("task-received", expired.id)[0]["expires"] == past.isoformat()
    assert monitor.of("task-revoked", expired.id)[0]["expired"] is True

    # How they travel: Celery's routing keys, the hostname header, never persisted.
    keys = {key for key, _, _ in monitor.deliveries}
    assert {"worker.online", "worker.offline", "task.multi"} <= keys
    assert all(headers.get("hostname") == HOSTNAME for _, headers, _ in monitor.deliveries)
    assert {mode for _, _, mode in monitor.deliveries} <= {1, None}  # Redis keeps no mode


def test_heartbeats_carry_what_flower_shows(queue: str, monitor: Monitor) -> None:
    ids = [tasks.multiply.apply_async(args=(i, i), queue=queue).id for i in range(3)]
    # Due in a second: the worker waits for it, idle, while heartbeats go out.
    ids.append(tasks.multiply.apply_async(args=(9, 9), queue=queue, countdown=1.2).id)
    worker = worker_for(queue, events=True, pool="threads")

    run(worker, 4)
    monitor.wait(lambda: monitor.of("worker-offline"), "worker-offline")

    online, beats = monitor.of("worker-online"), monitor.of("worker-heartbeat")
    offline = monitor.of("worker-offline")
    assert len(online) == 1 and len(beats) >= 2 and len(offline) == 1, monitor.events
    for beat in [*online, *beats, *offline]:
        assert beat["freq"] == 0.3
        assert beat["sw_ident"] == "django-tasks-q" and beat["sw_ver"] and beat["sw_sys"]
        assert len(beat["loadavg"]) == 3 and all(load >= 0 for load in beat["loadavg"])
    # While it waits for the last task: three done, none running.
    assert (beats[0]["processed"], beats[0]["active"]) == (3, 0)
    assert (offline[0]["processed"], offline[0]["active"]) == (4, 0)
    assert [e["uuid"] for e in monitor.of("task-succeeded")] == ids


def test_without_E_nothing_is_published_until_events_are_enabled(queue: str,
                                                                  monitor: Monitor) -> None:
    first, second, third = (tasks.multiply.apply_async(args=(i, 2), queue=queue).id
                            for i in range(3))
    worker = worker_for(queue, events=False, pool="threads")
    events = worker.consumer.events
    assert events is not None and not events.enabled

    def switch(done: int) -> None:
        # As the remote-control commands enable_events and disable_events do, between the
        # outcomes of the first and second tasks and of the second and third.
        if done == 1:
            assert events.enable() is True and events.enable() is False
        elif done == 2:
            assert events.disable() is True

    run(worker, 3, on_done=switch)
    monitor.wait(lambda: monitor.of("worker-offline"), "worker-offline")
    time.sleep(0.5)  # anything published late would be here by now

    # The third task started when the second finished, before events were switched off.
    assert [(e["type"], e.get("uuid")) for e in monitor.events] == [
        ("worker-online", None), ("task-succeeded", second), ("task-started", third),
        ("worker-offline", None)]
    assert not monitor.of("task-", first)
    assert not events.enabled and events.disable() is False
