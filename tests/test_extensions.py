"""Worker extensions in-process on memory://: how they are found, their options, the order of
their steps, their consumers (and what happens when they fail), and ``publish()``."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from kombu import Connection, Consumer, Exchange, Producer, Queue

from django_tasks_q import checks, extensions, producers
from django_tasks_q.exceptions import ExtensionError, ImproperlyConfigured
from django_tasks_q.extensions import (
    WorkerExtension,
    extension_classes,
    publish,
    register_worker_extension,
)
from django_tasks_q.message import TaskMessage
from django_tasks_q.worker import extensions as runner
from django_tasks_q.worker.main import Worker, WorkerOptions
from django_tasks_q.worker.pool import Job

pytestmark = pytest.mark.django_db(transaction=True)

MEMORY = {"BROKER_URL": "memory://"}
GIVE_UP = 20.0  # seconds before a worker that never stops is stopped cold

#: What the extensions below did, in order.
journal: list[str] = []


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Iterator[None]:
    settings.TASKS_Q = dict(MEMORY)
    monkeypatch.setattr(extensions, "_registered", [])
    journal.clear()
    # Worker.run installs its own handlers; the test process keeps pytest's.
    saved = {signum: signal.getsignal(signum)
             for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def new_worker(*classes: type[WorkerExtension], queue: str = "default",
               options: dict[type[WorkerExtension], dict[str, Any]] | None = None) -> Worker:
    return Worker(WorkerOptions(queues=[queue], concurrency=2, pool="threads",
                                hostname="ext@test", extensions=list(classes),
                                extension_options=options or {}))


def run(worker: Worker) -> None:
    """``worker.run()``, stopped cold after GIVE_UP seconds if nothing stops it before."""
    timer = threading.Timer(GIVE_UP, lambda: setattr(worker.consumer, "cold", True))
    timer.start()
    try:
        worker.run()
    finally:
        timer.cancel()


def stop_soon(worker: Worker, seconds: float = 0.0) -> None:
    """A warm shutdown, from the event loop, ``seconds`` from now."""
    worker.timer.call_after(seconds, setattr, (worker.consumer, "stopping", True))


def until(worker: Worker, check: Callable[[], bool], then: Callable[[], None],
          every: float = 0.02) -> None:
    """Call ``then()`` once ``check()`` is true, looking from the worker's event loop."""
    def look() -> None:
        if check():
            entry.cancel()
            then()

    entry = worker.timer.call_repeatedly(every, look)


# -- finding extensions ----------------------------------------------------------------------

class First(WorkerExtension):
    """Writes its steps to the journal."""

    def start(self, worker: Worker) -> None:
        journal.append(f"start {type(self).__name__}")

    def stop(self, worker: Worker) -> None:
        journal.append(f"stop {type(self).__name__}")


class Second(First):
    pass


class Third(First):
    pass


class FailsToStart(First):
    def start(self, worker: Worker) -> None:
        raise RuntimeError("no licence key")


class FailsToStop(First):
    def stop(self, worker: Worker) -> None:
        super().stop(worker)
        raise RuntimeError("stuck")


def path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_setting_comes_first_then_registrations_each_once(settings: Any) -> None:
    settings.TASKS_Q = {**MEMORY, "WORKER_EXTENSIONS": [path(Second), path(First)]}
    register_worker_extension(Third)
    assert register_worker_extension(First) is First  # usable as a decorator
    register_worker_extension(Third)
    assert extension_classes() == [Second, First, Third]


def test_register_takes_only_worker_extensions() -> None:
    with pytest.raises(TypeError, match="subclass of django_tasks_q.extensions.WorkerExtension"):
        register_worker_extension(object)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "says"), [
    (["testproject.nowhere.Feed"], "TASKS_Q['WORKER_EXTENSIONS'][0] is "
                                   "'testproject.nowhere.Feed', which cannot be imported"),
    ([path(First), "tests.test_extensions.Missing"], "[1] is 'tests.test_extensions.Missing', "
                                                     "which cannot be imported"),
    (["tests.test_extensions.path"], "which is not a subclass of "
                                     "django_tasks_q.extensions.WorkerExtension"),
    ([First], "write the dotted path of a WorkerExtension subclass as a string"),
    (path(First), "it must be a list of dotted paths"),
])
def test_a_bad_setting_names_the_entry_and_what_to_do(settings: Any, value: Any,
                                                      says: str) -> None:
    settings.TASKS_Q = {**MEMORY, "WORKER_EXTENSIONS": value}
    with pytest.raises(ImproperlyConfigured) as raised:
        extension_classes()
    assert says in str(raised.value)
    [error] = [e for e in checks.check_settings() if e.id == "django_tasks_q.E013"]
    assert says in error.msg
    # taskworker refuses to start, with the same words (argparse's error, as a CommandError).
    with pytest.raises(CommandError, match=r"WORKER_EXTENSIONS"):
        call_command("taskworker", "-P", "threads")


def test_a_good_setting_passes_the_check(settings: Any) -> None:
    settings.TASKS_Q = {**MEMORY, "WORKER_EXTENSIONS": [path(First)]}
    assert [e for e in checks.check_settings() if e.id == "django_tasks_q.E013"] == []


# -- options ---------------------------------------------------------------------------------

class Tuned(WorkerExtension):
    """Takes options of its own."""

    seen: dict[str, Any] = {}

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        parser.add_argument("--tuned-level", type=int, default=3)
        parser.add_argument("--tuned-name", default="plain")

    def __init__(self, worker: Worker, *, tuned_level: int, tuned_name: str,
                 **options: Any) -> None:
        super().__init__(worker, **options)
        Tuned.seen = {"level": tuned_level, "name": tuned_name, "worker": worker.hostname,
                      "other": options}

    def start(self, worker: Worker) -> None:
        raise RuntimeError("seen enough")  # ends the command before it consumes


def test_taskworker_passes_an_extension_its_own_options(settings: Any) -> None:
    settings.TASKS_Q = {**MEMORY, "WORKER_EXTENSIONS": [path(Tuned)]}
    with pytest.raises(CommandError) as raised:
        call_command("taskworker", "-P", "threads", "-n", "opts@test", "--tuned-level", "7")
    assert Tuned.seen == {"level": 7, "name": "plain", "worker": "opts@test", "other": {}}
    assert str(raised.value) == ("Worker extension tests.test_extensions.Tuned failed to start: "
                                 "RuntimeError: seen enough; the worker stopped")


def test_an_option_that_clashes_with_taskworker_s_is_refused(settings: Any) -> None:
    class Clashing(WorkerExtension):
        @classmethod
        def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
            parser.add_argument("-c", "--concurrency", type=int)

    with pytest.raises(ExtensionError, match="could not add its options to taskworker: "
                                             "argument -c/--concurrency: conflicting"):
        parser = argparse.ArgumentParser()
        parser.add_argument("-c", "--concurrency")
        runner.add_arguments(parser, [Clashing])


def test_a_worker_built_without_the_command_gets_the_declared_defaults() -> None:
    new_worker(Tuned)
    assert Tuned.seen["level"] == 3 and Tuned.seen["name"] == "plain"
    new_worker(Tuned, options={Tuned: {"tuned_level": 1, "tuned_name": "x"}})
    assert Tuned.seen["level"] == 1 and Tuned.seen["name"] == "x"


def test_a_constructor_that_raises_stops_the_worker_before_it_starts() -> None:
    class Broken(WorkerExtension):
        def __init__(self, worker: Worker, **options: Any) -> None:
            raise KeyError("API_TOKEN")

    with pytest.raises(ExtensionError, match=r"Worker extension .*Broken could not be created: "
                                             r"KeyError: 'API_TOKEN'"):
        new_worker(Broken)


# -- steps -----------------------------------------------------------------------------------

class Observer(First):
    """Notes what the worker offers at each step."""

    def start(self, worker: Worker) -> None:
        super().start(worker)
        journal.append(f"pool started {bool(getattr(worker.pool, '_threads', None))}")
        journal.append(f"connected {worker.consumer.connection is not None}")
        stop_soon(worker, 0.2)

    def stop(self, worker: Worker) -> None:
        super().stop(worker)
        journal.append(f"running {len(worker.active_tasks())}")


def test_steps_start_in_order_after_the_pool_and_stop_in_reverse() -> None:
    worker = new_worker(First, Observer, FailsToStop, Second)
    run(worker)
    assert journal == ["start First", "start Observer", "pool started True", "connected False",
                       "start FailsToStop", "start Second",
                       "stop Second", "stop FailsToStop", "stop Observer", "running 0",
                       "stop First"]


def test_a_step_that_fails_to_start_stops_the_worker_and_those_started_before(
        caplog: pytest.LogCaptureFixture) -> None:
    worker = new_worker(First, FailsToStart, Second)
    with pytest.raises(ExtensionError, match=r"^Worker extension tests.test_extensions."
                                             r"FailsToStart failed to start: RuntimeError: "
                                             r"no licence key$"):
        run(worker)
    assert journal == ["start First", "stop First"]
    assert "Traceback" in caplog.text and "no licence key" in caplog.text


def test_a_step_that_fails_to_stop_is_logged_and_the_others_still_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    class StopsSoon(First):
        def start(self, worker: Worker) -> None:
            stop_soon(worker)

    run(new_worker(First, FailsToStop, StopsSoon))
    assert journal == ["start First", "start FailsToStop", "stop StopsSoon", "stop FailsToStop",
                       "stop First"]
    assert "Worker extension tests.test_extensions.FailsToStop failed to stop" in caplog.text


def test_stop_steps_run_on_a_cold_shutdown_too() -> None:
    class GoesCold(First):
        def start(self, worker: Worker) -> None:
            super().start(worker)
            worker.timer.call_after(0.1, setattr, (worker.consumer, "cold", True))

    run(new_worker(First, GoesCold))
    assert journal == ["start First", "start GoesCold", "stop GoesCold", "stop First"]


def test_the_timer_runs_without_any_extension_too() -> None:
    # A worker_ready receiver (sender: the worker) may use it, as in Celery.
    from django_tasks_q import signals

    worker = new_worker()
    assert worker.extensions not in worker.consumer.watchers  # nothing added per task

    def ready(sender: Worker, **kwargs: Any) -> None:
        sender.timer.call_after(0.05, lambda: (journal.append("called"), stop_soon(sender)))

    signals.worker_ready.connect(ready, weak=False)
    try:
        run(worker)
    finally:
        signals.worker_ready.disconnect(ready)
    assert journal == ["called"]


def test_active_tasks_are_the_pool_s_jobs_with_their_start_times() -> None:
    worker = new_worker()
    msg = TaskMessage(id="t-1", name="shop.slow", args=[], kwargs={}, queue="reports")
    job = Job(msg, None, started=time.monotonic() - 5.0)
    waiting = Job(TaskMessage(id="t-2", name="shop.slow", args=[], kwargs={}), None)
    worker.pool.active = lambda: [waiting, job]  # type: ignore[method-assign]
    [task] = worker.active_tasks()
    assert (task.id, task.name, task.queue) == ("t-1", "shop.slow", "reports")
    assert 5.0 <= task.runtime < 6.0
    assert task.started_at.tzinfo is UTC
    assert abs((datetime.now(UTC) - task.started_at).total_seconds() - task.runtime) < 0.5


# -- consumers -------------------------------------------------------------------------------

EXCHANGE = Exchange("ext-unit", type="direct")


class Feed(WorkerExtension):
    """Consumes a queue of its own; the test sets its queue and what it does on each message."""

    queue: Queue
    style = "callbacks"
    channels: list[Any] = []
    got: list[Any] = []

    def get_consumers(self, channel: Any) -> Sequence[Consumer]:
        Feed.channels.append(channel)
        if self.style == "callbacks":
            return [Consumer(channel, queues=[self.queue], callbacks=[self.handle],
                             accept=["json"])]
        return [Consumer(channel, queues=[self.queue], on_message=self.on_message,
                         accept=["json"])]

    def handle(self, body: Any, message: Any) -> None:
        Feed.got.append(body)
        if body.get("fail"):
            raise ValueError(f"cannot take {body}")
        message.ack()

    def on_message(self, message: Any) -> None:
        self.handle(message.decode(), message)


@pytest.fixture
def feed() -> Iterator[type[Feed]]:
    name = f"ext-unit-{uuid.uuid4().hex[:8]}"
    Feed.queue = Queue(name, EXCHANGE, routing_key=name)
    Feed.channels, Feed.got, Feed.style = [], [], "callbacks"
    yield Feed
    with Connection("memory://") as conn:
        Feed.queue(conn.default_channel).delete()


def send(body: Any, **kwargs: Any) -> str:
    return publish(body, exchange=EXCHANGE, routing_key=Feed.queue.routing_key,
                   declare=[Feed.queue], **kwargs)


def left_in_queue() -> int:
    with Connection("memory://") as conn:
        return int(Feed.queue(conn.default_channel).queue_declare(passive=True).message_count)


@pytest.mark.parametrize("style", ["callbacks", "on_message"])
def test_a_consumer_gets_messages_on_the_worker_s_connection_and_acks_them(
        feed: type[Feed], style: str, caplog: pytest.LogCaptureFixture) -> None:
    feed.style = style
    worker = new_worker(feed)
    ids: list[str] = []

    def publish_all() -> None:
        ids.append(send({"n": 1}))
        ids.append(send({"n": 2, "fail": True}))
        # A plain kombu producer, on an exchange and routing key of its own choosing.
        with Connection("memory://") as conn:
            Producer(conn.default_channel).publish(
                {"n": 3}, exchange=EXCHANGE, routing_key=feed.queue.routing_key,
                serializer="json", message_id="plain-3")
            # Not JSON: the consumer accepts only JSON.
            Producer(conn.default_channel).publish(
                {"n": 4}, exchange=EXCHANGE, routing_key=feed.queue.routing_key,
                serializer="pickle", message_id="pickled-4")
        ids.append(send({"n": 5}))

    worker.timer.call_after(0.05, publish_all)
    until(worker, lambda: len(feed.got) == 4, lambda: stop_soon(worker, 0.1))
    run(worker)

    assert [body["n"] for body in feed.got] == [1, 2, 3, 5]  # the pickled one never reached it
    assert feed.channels and feed.channels[0] is not worker.consumer._channel
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    # With callbacks kombu decodes the body; an on_message handler decodes it itself.
    undecodable = ("it cannot be decoded (ContentDisallowed: Refusing to deserialize untrusted "
                   "content of type pickle (application/x-python-serialize))"
                   if style == "callbacks" else "its handler raised")
    assert [r.getMessage() for r in failed] == [
        f"Worker extension tests.test_extensions.Feed: message {ids[1]} (exchange 'ext-unit', "
        f"routing key '{feed.queue.name}'): its handler raised; rejected",
        f"Worker extension tests.test_extensions.Feed: message pickled-4 (exchange 'ext-unit', "
        f"routing key '{feed.queue.name}'): {undecodable}; rejected"]
    assert "ValueError: cannot take" in caplog.text  # the handler's traceback
    assert left_in_queue() == 0  # acknowledged or rejected: none comes back


def test_what_a_handler_or_a_timer_call_sent_is_confirmed_when_it_returns(
        feed: type[Feed], monkeypatch: pytest.MonkeyPatch) -> None:
    # As a pool child has a task's messages confirmed when the task ends (broker.Publisher).
    from django_tasks_q import broker

    class Journaled(Feed):
        def handle(self, body: Any, message: Any) -> None:
            super().handle(body, message)
            journal.append("handler returned")

    monkeypatch.setattr(broker, "flush_or_log", lambda: journal.append("flushed"))
    worker = new_worker(Journaled)
    worker.timer.call_after(0.05, lambda: (send({"n": 1}), journal.append("timer call")))
    until(worker, lambda: len(feed.got) == 1, lambda: stop_soon(worker))
    run(worker)
    for call in ("timer call", "handler returned"):
        assert journal[journal.index(call) + 1] == "flushed", journal


def test_consumers_start_again_on_every_reconnect(feed: type[Feed]) -> None:
    worker = new_worker(feed)
    worker.timer.call_after(0.05, send, ({"n": 1},))

    def reconnect() -> None:
        worker.consumer._stalled = True  # what the consumer's watchdog does
        until(worker, lambda: len(feed.channels) == 2, lambda: send({"n": 2}))
        until(worker, lambda: len(feed.got) == 2, lambda: stop_soon(worker))

    until(worker, lambda: len(feed.got) == 1, reconnect)
    run(worker)
    assert [body["n"] for body in feed.got] == [1, 2]
    first, second = feed.channels  # a channel of each connection (both closed by now)
    assert first is not second
    assert left_in_queue() == 0


class Noted(Consumer):  # type: ignore[misc]
    """A kombu consumer that writes its cancellation to the journal."""

    def cancel(self) -> None:
        journal.append("consumer cancelled")
        super().cancel()


def test_consumers_are_cancelled_when_the_shutdown_begins(feed: type[Feed]) -> None:
    class Cancellable(Feed, First):
        def get_consumers(self, channel: Any) -> Sequence[Consumer]:
            return [Noted(channel, queues=[self.queue], callbacks=[self.handle])]

        def start(self, worker: Worker) -> None:
            super().start(worker)
            stop_soon(worker, 0.1)

    run(new_worker(Cancellable))
    assert journal == ["start Cancellable", "consumer cancelled", "stop Cancellable"]


def test_consumers_that_cannot_start_on_the_first_connection_stop_the_worker(
        feed: type[Feed]) -> None:
    class NoHandler(Feed):
        def get_consumers(self, channel: Any) -> Sequence[Consumer]:
            return [Consumer(channel, queues=[self.queue])]

    class Raises(Feed):
        def get_consumers(self, channel: Any) -> Sequence[Consumer]:
            raise LookupError("no such vhost")

    with pytest.raises(ExtensionError, match=r"NoHandler could not start its consumers: "
                                             r"ValueError: get_consumers\(\) returned .* "
                                             r"neither callbacks nor on_message"):
        run(new_worker(First, NoHandler))
    assert journal == ["start First", "stop First"]
    with pytest.raises(ExtensionError, match=r"Raises could not start its consumers: "
                                             r"LookupError: no such vhost"):
        run(new_worker(Raises))


def test_consumers_that_cannot_start_after_a_reconnect_are_tried_again(
        feed: type[Feed], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runner, "CONSUMERS_RETRY", 0.1)

    class Flaky(Feed):
        def get_consumers(self, channel: Any) -> Sequence[Consumer]:
            consumers = super().get_consumers(channel)
            if len(Feed.channels) == 2:  # the first try after the reconnect
                raise RuntimeError("the integration's vhost is restarting")
            return consumers

    worker = new_worker(Flaky)

    def reconnect() -> None:
        worker.consumer._stalled = True
        until(worker, lambda: len(feed.channels) == 3, lambda: send({"n": 2}))
        until(worker, lambda: len(feed.got) == 2, lambda: stop_soon(worker))

    worker.timer.call_after(0.05, send, ({"n": 1},))
    until(worker, lambda: len(feed.got) == 1, reconnect)
    run(worker)
    assert [body["n"] for body in feed.got] == [1, 2]
    assert (f"Worker extension {extensions.label(Flaky)} could not start its consumers again "
            f"after reconnecting; trying again in 0.1s") in caplog.text


# -- publish() -------------------------------------------------------------------------------

def test_publish_sends_json_with_a_message_id_through_a_pool_it_keeps(feed: type[Feed]) -> None:
    first = send({"order": 1}, headers={"source": "storefront"})
    assert send({"order": 2}, message_id="mine-2", priority=3) == "mine-2"
    pool = producers.pool()
    assert producers.pool() is pool
    with Connection("memory://") as conn:
        bound = feed.queue(conn.default_channel)
        got = [bound.get(no_ack=True), bound.get(no_ack=True)]
    assert [m.decode() for m in got] == [{"order": 1}, {"order": 2}]
    assert [m.properties["message_id"] for m in got] == [first, "mine-2"]
    assert uuid.UUID(first)
    assert got[0].content_type == "application/json"
    assert got[0].headers == {"source": "storefront"}


def test_the_producer_pool_follows_the_broker_setting(settings: Any) -> None:
    pool = producers.pool()
    settings.TASKS_Q = {**MEMORY, "BROKER_OPTIONS": {"polling_interval": 0.5}}
    assert producers.pool() is not pool
