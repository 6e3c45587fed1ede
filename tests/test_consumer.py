"""The worker's consumer in-process on memory:// (threads and solo pools, never prefork here)."""

from __future__ import annotations

import logging
import pickle
import time
from typing import Any

import pytest
from django.db import OperationalError
from kombu import Connection, Producer

from django_tasks_q import AsyncResult, broker, message
from django_tasks_q.models import TaskResult
from django_tasks_q.worker import consumer as consumer_module
from django_tasks_q.worker import writer as writer_module
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.main import Worker, WorkerOptions
from django_tasks_q.worker.pool import POOLS, Job

from . import tasks
from .running import run_consumer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _empty_queue() -> None:
    with Connection("memory://") as conn:
        broker.queue("default")(conn.default_channel).purge()


def run_until(pool_name: str, expected: int, timeout: float = 15.0) -> list[tuple[str, str]]:
    """Run a consumer on queue ``default`` until ``expected`` jobs finished."""
    pool = POOLS[pool_name](2, "t", on_done=lambda j, o: None)
    consumer = Consumer(["default"], pool, "t", prefetch=4)
    return [(job.msg.name, outcome.status)
            for job, outcome in run_consumer(consumer, expected, timeout)]


def raw_publish(body: Any, headers: dict[str, Any], **kw: Any) -> None:
    with Connection("memory://") as conn:
        Producer(conn).publish(body, exchange=broker.queue("default").exchange,
                               routing_key="default", headers=headers,
                               declare=[broker.queue("default")], **kw)


def queue_size() -> int:
    with Connection("memory://") as conn:
        declared = broker.queue("default")(conn.default_channel).queue_declare(passive=True)
        return declared.message_count


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_runs_tasks_and_stores_what_is_asked(pool: str) -> None:
    r = tasks.multiply.delay(3, 4)
    tasks.boom.delay("x")
    assert sorted(run_until(pool, 2)) == [("tests.tasks.boom", "FAILURE"),
                                          ("tests.tasks.multiply", "SUCCESS")]
    assert r.get(timeout=1) == 12
    assert TaskResult.objects.filter(status="FAILURE", task_name="tests.tasks.boom").count() == 1
    assert queue_size() == 0


def test_successes_kept_under_all_are_stored_together_before_their_acks(settings: Any) -> None:
    settings.TASKS_Q = {**settings.TASKS_Q, "RESULTS": "all"}
    sent = [tasks.multiply.delay(n, 2) for n in range(12)]
    assert run_until("solo", 12) == [("tests.tasks.multiply", "SUCCESS")] * 12
    assert [r.get(timeout=1) for r in sent] == [n * 2 for n in range(12)]
    # The rows of one batch share their date_done: several rows per statement.
    assert 1 <= TaskResult.objects.values("date_done").distinct().count() < 12
    assert queue_size() == 0


@pytest.mark.parametrize("rows", [True, False], ids=["storing-rows", "no-rows"])
@pytest.mark.parametrize("short", [True, False], ids=["short-tasks", "long-tasks"])
def test_short_tasks_get_room_in_the_window_while_they_run(
        monkeypatch: pytest.MonkeyPatch, short: bool, rows: bool) -> None:
    # Finished tasks hold their slots (memory://, as RabbitMQ) until acknowledged, and those
    # storing a row (multiply: results="all") until it is written.
    if not short:
        monkeypatch.setattr(consumer_module, "QUEUE_BEHIND_UNDER", 0.0)  # every task is long
    windows: list[int] = []
    monkeypatch.setattr(Consumer, "_set_prefetch", lambda self: windows.append(self._window()))
    for n in range(6):
        (tasks.multiply if rows else tasks.add).delay(n, 2)
    pool = POOLS["solo"](1, "t", on_done=lambda j, o: None)
    consumer = Consumer(["default"], pool, "t", prefetch=4)
    assert len(run_consumer(consumer, 6, 15)) == 6
    room = [w for w in windows if w == 4 + consumer_module.SHORT_ROOM]
    assert bool(room) is short and set(windows) <= {4, 4 + consumer_module.SHORT_ROOM}
    windows.clear()
    consumer._check_short_room()  # short tasks finished since the last look: kept
    consumer._check_short_room()  # none since: taken back
    assert windows == ([4] if short else [])
    assert TaskResult.objects.filter(status="SUCCESS").count() == (6 if rows else 0)


def test_successes_whose_rows_cannot_be_written_are_given_back_and_run_again(
        settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.TASKS_Q = {**settings.TASKS_Q, "RESULTS": "all"}
    monkeypatch.setattr(consumer_module, "REQUEUE_DELAY", 0.05)
    real, failures = writer_module.store_success, []

    def store_once_failing(done: list[Any], hostname: str) -> None:
        if not failures:
            failures.append(len(done))
            raise OperationalError("the database went away")
        real(done, hostname)

    monkeypatch.setattr(writer_module, "store_success", store_once_failing)
    sent = [tasks.multiply.delay(n, 3) for n in range(3)]
    ran = run_until("solo", 3 + 3, timeout=10)  # some ran twice: given back, not lost
    assert failures and len(ran) == 3 + failures[0]
    assert [r.get(timeout=1) for r in sent] == [0, 3, 6]
    assert queue_size() == 0


def test_undecodable_and_pickled_messages_are_dropped_once(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    raw_publish(pickle.dumps(([1], {}, {})), {"task": "tests.tasks.multiply", "id": "pickled"},
                content_type="application/x-python-serialize", content_encoding="binary")
    raw_publish("{not json", {"task": "tests.tasks.multiply", "id": "garbled"},
                content_type="application/json", content_encoding="utf-8")
    raw_publish("[1, 2]", {"task": "tests.tasks.multiply", "id": "wrong-shape"},
                content_type="application/json", content_encoding="utf-8")
    tasks.multiply.delay(1, 1)  # the worker carries on after them
    with caplog.at_level(logging.ERROR, "django_tasks_q.worker"):
        assert run_until("solo", 1) == [("tests.tasks.multiply", "SUCCESS")]
    dropped = [r.getMessage() for r in caplog.records if "Dropped message" in r.getMessage()]
    assert len(dropped) == 3
    assert any("pickled" in d and "x-python-serialize" in d for d in dropped)
    assert any("garbled" in d for d in dropped) and any("wrong-shape" in d for d in dropped)
    assert queue_size() == 0


def test_retry_is_published_again_and_runs() -> None:
    r = tasks.retries_then_ok.delay(2)
    assert run_until("threads", 3) == [("tests.tasks.retries_then_ok", "RETRY")] * 2 + [
        ("tests.tasks.retries_then_ok", "SUCCESS")]
    assert r.get(timeout=1) == 2


def test_countdown_task_waits_until_due() -> None:
    import time

    r = tasks.multiply.apply_async(args=(2, 2), countdown=1.5)
    start = time.monotonic()
    assert run_until("solo", 1) == [("tests.tasks.multiply", "SUCCESS")]
    assert time.monotonic() - start >= 1.4
    assert r.get(timeout=1) == 4


def test_revoked_task_is_not_run() -> None:
    r = tasks.multiply.apply_async(args=(1, 2), countdown=1.2)
    AsyncResult(r.id).revoke()
    tasks.multiply.delay(5, 5)
    assert run_until("solo", 1) == [("tests.tasks.multiply", "SUCCESS")]
    assert AsyncResult(r.id).status == "REVOKED"


def test_ids_revoked_before_the_start_are_read_before_the_pool_starts() -> None:
    r = tasks.multiply.delay(1, 2)  # due at once: only the ids read at the start can stop it
    AsyncResult(r.id).revoke()
    tasks.multiply.delay(5, 5)
    consumer = Consumer(["default"], POOLS["solo"](1, "t", on_done=lambda j, o: None), "t",
                        prefetch=4)
    consumer.read_revoked()  # as Worker.run does, before the pool starts
    assert r.id in consumer.revoked
    done = run_consumer(consumer, 1, 15)
    assert [(job.msg.name, job.msg.args, outcome.status) for job, outcome in done] == [
        ("tests.tasks.multiply", [5, 5], "SUCCESS")]
    assert AsyncResult(r.id).status == "REVOKED"


def test_prefork_is_refused_on_memory_broker() -> None:
    with pytest.raises(ValueError, match="memory:// broker lives inside one process"):
        Worker(WorkerOptions(queues=["default"], concurrency=2, pool="prefork"))
    assert Worker(WorkerOptions(queues=["default"], concurrency=2, pool="threads")).pool.size == 2


def test_acks_late_false_acknowledges_before_running(settings: Any) -> None:
    tasks.early_ack.delay()
    acked_at_start: list[bool] = []
    original = POOLS["solo"].submit

    def submit(self: Any, job: Job) -> None:
        acked_at_start.append(job.settled)
        original(self, job)

    POOLS["solo"].submit = submit  # type: ignore[method-assign]
    try:
        assert run_until("solo", 1) == [("tests.tasks.early_ack", "SUCCESS")]
        tasks.multiply.delay(1, 1)
        assert run_until("solo", 1) == [("tests.tasks.multiply", "SUCCESS")]
    finally:
        POOLS["solo"].submit = original  # type: ignore[method-assign]
    assert acked_at_start == [True, False]
    assert queue_size() == 0


def test_rate_limit_spaces_out_starts() -> None:
    import time

    for _ in range(4):
        tasks.limited.delay()
    start = time.monotonic()
    assert run_until("solo", 4) == [("tests.tasks.limited", "SUCCESS")] * 4
    assert 0.9 <= time.monotonic() - start < 4  # two at once (the burst), then one per 0.5 s
    assert queue_size() == 0


def test_bad_rate_limit_is_refused_when_the_task_is_defined() -> None:
    from django_tasks_q import task
    from django_tasks_q.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match=r"'10 per second' is not of the form"):
        task(rate_limit="10 per second")(lambda: None)


def test_a_task_due_much_later_is_parked_in_the_database_then_released() -> None:
    from datetime import timedelta

    from django.utils import timezone

    from django_tasks_q.models import ParkedMessage

    later = tasks.multiply.apply_async(args=(6, 7), countdown=3600)
    tasks.multiply.delay(1, 1)
    assert run_until("solo", 1) == [("tests.tasks.multiply", "SUCCESS")]
    [parked] = ParkedMessage.objects.all()
    assert parked.task_id == later.id and queue_size() == 0  # acked: nothing held anywhere
    assert (parked.due_at - timezone.now()).total_seconds() > 3500

    ParkedMessage.objects.update(due_at=timezone.now() - timedelta(seconds=1))
    assert run_until("solo", 1) == [("tests.tasks.multiply", "SUCCESS")]
    assert later.get(timeout=1) == 42
    assert ParkedMessage.objects.count() == 0


def test_parking_the_same_message_twice_keeps_one_row() -> None:
    from django_tasks_q.models import ParkedMessage
    from django_tasks_q.worker.parking import Parking

    tasks.multiply.apply_async(args=(1, 2), countdown=3600)
    with Connection("memory://") as conn:
        raw = conn.SimpleQueue(broker.queue("default")).get(timeout=1)
        msg = message.decode(raw.headers, raw.decode(), queue="default")
    parking = Parking("t")
    parking.park([msg])
    parking.park([msg])  # redelivered after a crash between park and ack
    assert ParkedMessage.objects.count() == 1


class _Hub:
    def __init__(self) -> None:
        self.later: list[float] = []

    def call_later(self, delay: float, callback: Any) -> None:
        self.later.append(delay)


def test_a_small_fetch_waits_a_little_only_while_received_work_waits_for_the_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "FETCH_DELAY", 0.2)
    consumer = Consumer(["default"], POOLS["solo"](1, "t", on_done=lambda j, o: None), "t",
                        prefetch=8)
    hub = consumer.hub = _Hub()
    assert consumer._defer_fetch(1) is False  # nothing waits here: fetch now
    consumer.buffer.append(Job(message.TaskMessage(id="a", name="x", args=[], kwargs={}), None))
    assert consumer._defer_fetch(1) is True
    assert consumer._defer_fetch(2) is True
    assert hub.later == [0.2]  # one wake-up of the loop, when the wait is over
    time.sleep(0.25)
    assert consumer._defer_fetch(2) is False  # waited long enough
    assert consumer._defer_fetch(2) is True and hub.later == [0.2, 0.2]  # a new wait
    consumer.buffer.clear()
    assert consumer._defer_fetch(2) is False
