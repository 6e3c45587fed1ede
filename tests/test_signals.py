"""Signals: each one is sent at its moment, with Celery's arguments (memory://, in-process)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.dispatch import Signal
from django.test import override_settings
from kombu.connection import Connection

from django_tasks_q import AsyncResult, beat, broker, execute, message, signals, task
from django_tasks_q.exceptions import Reject, TimeLimitExceeded
from django_tasks_q.execute import Outcome, Request
from django_tasks_q.models import SchedulerLease, TaskResult
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.main import Worker, WorkerOptions
from django_tasks_q.worker.pool import LOST, POOLS, Job, PreforkPool

from . import tasks
from .running import run_consumer

pytestmark = pytest.mark.django_db(transaction=True)

ALL = ("before_task_publish", "after_task_publish", "task_prerun", "task_postrun",
       "task_success", "task_failure", "task_retry", "task_revoked", "worker_ready",
       "worker_shutdown", "worker_process_init", "beat_init")


@task
def rejected() -> None:
    raise Reject("not this one", requeue=False)


@contextlib.contextmanager
def listening(sig: Signal) -> Iterator[list[dict[str, Any]]]:
    """What ``sig`` is sent with while the block runs: one dict per send, ``sender`` included."""
    calls: list[dict[str, Any]] = []

    def receiver(sender: Any, signal: Signal, **kwargs: Any) -> None:
        calls.append({"sender": sender, **kwargs})

    sig.connect(receiver, weak=False)
    try:
        yield calls
    finally:
        sig.disconnect(receiver)


@contextlib.contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Give back the handlers a worker or a beat installs for SIGTERM, SIGINT and SIGQUIT."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def msg(name: str, *args: Any, **kwargs: Any) -> message.TaskMessage:
    return message.TaskMessage(id=message.new_id(), name=name, args=list(args), kwargs=kwargs,
                               queue="default")


def queue_size(queue: str = "default") -> int:
    with Connection("memory://") as conn:
        declared = broker.queue(queue)(conn.default_channel).queue_declare(passive=True)
        return int(declared.message_count)


@pytest.fixture(autouse=True)
def _empty_queues() -> None:
    with Connection("memory://") as conn:
        for queue in ("default", "low"):
            broker.queue(queue)(conn.default_channel).purge()


def consumer(pool: str = "solo") -> Consumer:
    return Consumer(["default"], POOLS[pool](1, "t", on_done=lambda j, o: None), "t",
                    prefetch=4)


class AckedMessage:
    """Stands in for the kombu message of a job settled outside a broker connection."""

    def __init__(self) -> None:
        self.acked = False

    def ack(self) -> None:
        self.acked = True


def test_every_signal_documents_its_sender_and_arguments() -> None:
    for name in ALL:
        sig = getattr(signals, name)
        assert isinstance(sig, Signal) and "``sender``" in (sig.__doc__ or ""), name


def test_a_receiver_that_raises_is_logged_and_the_task_still_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.task_prerun.connect(broken)
    try:
        with listening(signals.task_success) as succeeded:
            outcome = execute.run(msg("tests.tasks.multiply", 2, 3))
    finally:
        signals.task_prerun.disconnect(broken)
    assert outcome.status == "SUCCESS" and [c["result"] for c in succeeded] == [6]
    assert "receiver bug" in caplog.text


# -- publishing -----------------------------------------------------------------------------

def test_before_task_publish() -> None:
    seen_in_queue: list[int] = []

    def add_header(sender: Any, headers: dict[str, Any], **kwargs: Any) -> None:
        seen_in_queue.append(queue_size("low"))
        headers["x-trace"] = "abc"  # a receiver may add headers, as tracing tools do

    signals.before_task_publish.connect(add_header)
    try:
        with listening(signals.before_task_publish) as calls:
            r = tasks.multiply.apply_async(args=(2, 3), queue="low", headers={"x-app": 1})
    finally:
        signals.before_task_publish.disconnect(add_header)

    [call] = calls
    assert call["sender"] == "tests.tasks.multiply"
    assert call["body"] == ([2, 3], {}, message.EMBED)
    assert (call["exchange"], call["routing_key"], call["declare"]) == ("", "low", [])
    assert call["headers"]["id"] == r.id and call["headers"]["task"] == "tests.tasks.multiply"
    assert call["headers"]["x-app"] == 1
    assert call["properties"]["correlation_id"] == r.id
    assert call["retry_policy"] == broker.PUBLISH_RETRY_POLICY
    assert seen_in_queue == [0]  # sent before the message reached the broker
    with Connection("memory://") as conn:
        received = conn.SimpleQueue(broker.queue("low")).get(block=False)
        assert received.headers["x-trace"] == "abc"
        received.ack()


def test_after_task_publish() -> None:
    in_queue: list[int] = []

    def count(sender: Any, routing_key: str, **kwargs: Any) -> None:
        in_queue.append(queue_size(routing_key))

    signals.after_task_publish.connect(count)
    try:
        with listening(signals.after_task_publish) as calls:
            r = tasks.multiply.delay(4, 5)
    finally:
        signals.after_task_publish.disconnect(count)

    [call] = calls
    assert call["sender"] == "tests.tasks.multiply"
    assert call["body"] == ([4, 5], {}, message.EMBED)
    assert (call["exchange"], call["routing_key"], call["headers"]["id"]) == ("", "default",
                                                                              r.id)
    assert in_queue == [1]  # sent once the message is in the queue


# -- running --------------------------------------------------------------------------------

def test_task_prerun() -> None:
    m = msg("tests.tasks.multiply", 2, 3)
    requests: list[Request | None] = []

    def look(sender: Any, **kwargs: Any) -> None:
        requests.append(execute.current_request())

    signals.task_prerun.connect(look)
    try:
        with listening(signals.task_prerun) as calls, listening(signals.task_success) as done:
            execute.run(m, hostname="w1")
    finally:
        signals.task_prerun.disconnect(look)
    [call] = calls
    assert call == {"sender": tasks.multiply, "task_id": m.id, "task": tasks.multiply,
                    "args": [2, 3], "kwargs": {}}
    [request] = requests  # before the run, in its context: self.request is set already
    assert request is not None and (request.id, request.hostname) == (m.id, "w1")
    assert len(done) == 1


def test_task_postrun() -> None:
    runs = [msg("tests.tasks.multiply", 2, 3), msg("tests.tasks.boom", "bad"),
            msg("tests.tasks.always_flaky"), msg(rejected.name)]
    with listening(signals.task_postrun) as calls:
        for m in runs:
            execute.run(m)
    assert [(c["sender"], c["task_id"], c["state"]) for c in calls] == [
        (tasks.multiply, runs[0].id, "SUCCESS"), (tasks.boom, runs[1].id, "FAILURE"),
        (tasks.always_flaky, runs[2].id, "RETRY"), (rejected, runs[3].id, "REJECTED")]
    success, failure, retry, reject = calls
    assert (success["retval"], success["args"], success["kwargs"]) == (6, [2, 3], {})
    assert success["task"] is tasks.multiply
    assert isinstance(failure["retval"], ValueError) and str(failure["retval"]) == "bad"
    assert isinstance(retry["retval"], tasks.Flaky)
    assert reject["retval"] is None


def test_task_success() -> None:
    with listening(signals.task_success) as calls:
        execute.run(msg("tests.tasks.multiply", 6, 7))
        execute.run(msg("tests.tasks.boom", "no success"))
    assert calls == [{"sender": tasks.multiply, "result": 42}]


def test_task_failure() -> None:
    raised, unstorable = msg("tests.tasks.boom", "bad input"), msg("tests.tasks.echo", "set")
    with listening(signals.task_failure) as calls:
        execute.run(raised)
        execute.run(unstorable)  # a return value that cannot be stored fails the task too
        execute.run(msg("tests.tasks.multiply", 1, 1))
    first, second = calls
    assert (first["sender"], first["task_id"], first["args"], first["kwargs"]) == (
        tasks.boom, raised.id, ["bad input"], {})
    assert type(first["exception"]) is ValueError and str(first["exception"]) == "bad input"
    assert "raise ValueError(message)" in first["traceback"]
    assert first["einfo"] == first["traceback"]
    assert (second["sender"], second["task_id"]) == (tasks.echo, unstorable.id)
    assert "cannot be stored as JSON" in str(second["exception"])


def test_task_failure_in_the_worker_for_a_task_killed_at_its_time_limit() -> None:
    m = msg("tests.tasks.multiply", 1, 2)
    job = Job(m, AckedMessage())
    job.timed_out = 1.0
    with listening(signals.task_failure) as calls:
        consumer().on_done(job, Outcome(LOST, error="pool child died (signal SIGKILL)"))
    [call] = calls
    assert (call["sender"], call["task_id"], call["args"], call["kwargs"]) == (
        tasks.multiply, m.id, [1, 2], {})
    assert isinstance(call["exception"], TimeLimitExceeded)
    assert (call["traceback"], call["einfo"]) == ("", "")
    assert TaskResult.objects.get(task_id=m.id).status == "FAILURE"
    assert job.message.acked


def test_task_retry() -> None:
    m = msg("tests.tasks.always_flaky")
    m.retries = 1
    with listening(signals.task_retry) as calls:
        outcome = execute.run(m, hostname="w1")
    assert outcome.status == "RETRY"
    [call] = calls
    assert call["sender"] is tasks.always_flaky
    request = call["request"]
    assert isinstance(request, Request)
    assert (request.id, request.task, request.retries, request.hostname) == (
        m.id, "tests.tasks.always_flaky", 1, "w1")
    assert isinstance(call["reason"], tasks.Flaky) and str(call["reason"]) == "still flaky"
    assert "Flaky: still flaky" in call["einfo"]


def test_task_revoked_when_expired_dropped_or_terminated() -> None:
    expired = msg("tests.tasks.multiply", 1, 1)
    expired.expires = datetime.now(UTC) - timedelta(seconds=1)
    with listening(signals.task_revoked) as calls:
        execute.run(expired, hostname="w1")
    [call] = calls
    assert call["sender"] is tasks.multiply and call["request"].id == expired.id
    assert (call["expired"], call["terminated"], call["signum"]) == (True, False, None)

    # Revoked before a worker received it: the worker drops it without running it.
    dropped = tasks.multiply.delay(2, 2)
    AsyncResult(dropped.id).revoke()
    other = tasks.multiply.delay(3, 3)
    with listening(signals.task_revoked) as calls, listening(signals.task_prerun) as ran:
        finished = run_consumer(consumer(), 1, timeout=15)
    assert [job.msg.args for job, _ in finished] == [[3, 3]]
    [call] = calls
    assert call["sender"] is tasks.multiply and isinstance(call["request"], Request)
    assert (call["request"].id, call["request"].args, call["request"].hostname) == (
        dropped.id, [2, 2], "t")
    assert (call["expired"], call["terminated"], call["signum"]) == (False, False, None)
    assert [c["task_id"] for c in ran] == [other.id]  # the revoked one never started

    # Revoked with terminate=True while it ran: its prefork child was killed (SIGKILL).
    killed = msg("tests.tasks.multiply", 4, 4)
    job = Job(killed, AckedMessage())
    job.revoked = True
    with listening(signals.task_revoked) as calls:
        consumer().on_done(job, Outcome(LOST, error="pool child died (signal SIGKILL)"))
    [call] = calls
    assert call["sender"] is tasks.multiply and call["request"].id == killed.id
    assert (call["expired"], call["terminated"], call["signum"]) == (
        False, True, signal.SIGKILL)


# -- processes ------------------------------------------------------------------------------

def run_worker() -> tuple[Worker, list[dict[str, Any]], list[dict[str, Any]]]:
    """Run a solo worker on memory:// that stops as soon as it is ready; (worker, what
    ``worker_ready`` was sent with, what ``worker_shutdown`` was sent with)."""
    worker = Worker(WorkerOptions(queues=["default"], concurrency=1, pool="solo",
                                  hostname="sig@test"))

    def stop(sender: Worker, **kwargs: Any) -> None:
        sender.consumer.stopping = True

    signals.worker_ready.connect(stop)
    try:
        with own_signal_handlers(), listening(signals.worker_ready) as ready, \
                listening(signals.worker_shutdown) as shutdown:
            assert worker.run() == 0
    finally:
        signals.worker_ready.disconnect(stop)
    return worker, ready, shutdown


def test_worker_ready() -> None:
    consuming: list[bool] = []

    def look(sender: Worker, **kwargs: Any) -> None:
        consuming.append(sender.consumer.kombu is not None)

    signals.worker_ready.connect(look)
    try:
        worker, ready, shutdown = run_worker()
    finally:
        signals.worker_ready.disconnect(look)
    assert ready == [{"sender": worker}]
    assert consuming == [True]  # sent once the worker consumes from its queues
    assert len(shutdown) == 1


def test_worker_shutdown() -> None:
    stopped_pool: list[bool] = []

    def look(sender: Worker, **kwargs: Any) -> None:
        stopped_pool.append(not sender.pool.active())

    signals.worker_shutdown.connect(look)
    try:
        worker, ready, shutdown = run_worker()
    finally:
        signals.worker_shutdown.disconnect(look)
    assert len(ready) == 1
    assert shutdown == [{"sender": worker}]
    assert stopped_pool == [True]


@override_settings(TASKS_Q={"BROKER_URL": "redis://127.0.0.1:1/0"})  # never connected
def test_worker_process_init_in_each_prefork_child(tmp_path: Path) -> None:
    record = tmp_path / "children"

    def note(sender: Any, **kwargs: Any) -> None:  # runs in the child: leaves a trace on disk
        with open(record, "a") as out:
            out.write(f"{os.getpid()} {sender!r}\n")

    signals.worker_process_init.connect(note)
    pool = PreforkPool(2, "t", on_done=lambda j, o: None)
    try:
        pool.start()
        children = set(pool.pids())
        deadline = time.monotonic() + 10
        while (not record.exists() or len(record.read_text().splitlines()) < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        pool.stop()
        signals.worker_process_init.disconnect(note)
    lines = record.read_text().splitlines()
    assert sorted(lines) == sorted(f"{pid} None" for pid in children)
    assert str(os.getpid()) not in {line.split()[0] for line in lines}  # not in the parent


def test_beat_init() -> None:
    leases: list[int] = []

    def stop_at_once(sender: beat.Beat, **kwargs: Any) -> None:
        leases.append(SchedulerLease.objects.count())
        sender.stop()

    signals.beat_init.connect(stop_at_once)
    scheduler = beat.Beat("sig-beat")
    try:
        with own_signal_handlers(), listening(signals.beat_init) as calls:
            scheduler.run()
    finally:
        signals.beat_init.disconnect(stop_at_once)
    assert calls == [{"sender": scheduler}]
    assert leases == [0]  # before its first tick: it had not tried to lead yet
    assert not scheduler.leading


def test_no_publish_signals_in_eager_mode(settings: Any) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://", "EAGER": True}
    with listening(signals.before_task_publish) as before, \
            listening(signals.after_task_publish) as after, \
            listening(signals.task_postrun) as postrun:
        assert tasks.multiply.delay(2, 2).get() == 4
    assert before == [] and after == []
    assert [(c["retval"], c["state"]) for c in postrun] == [(4, "SUCCESS")]
