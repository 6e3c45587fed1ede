"""Remote control on every broker: a running consumer answers ping and inspect, honours revoke,
and Celery's own ``inspect`` reaches it too; queue lengths and purge from outside."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from django_tasks_q import broker, control, message
from django_tasks_q.models import TaskResult, TaskState
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.control import Control
from django_tasks_q.worker.pool import ThreadPool

from . import tasks
from .test_broker_contract import publish, qname, target  # noqa: F401 - fixtures

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]

HOST = "ctl-test@here"


def until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """``check()``'s first true value, polled; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout}s: {check}")


@pytest.fixture
def running(qname: str) -> Iterator[Consumer]:  # noqa: F811
    """A consumer of ``qname`` with two threads and remote control, running in a thread."""
    pool = ThreadPool(2, HOST, on_done=lambda j, o: None)
    consumer = Consumer([qname], pool, HOST, prefetch=4)
    consumer.watchers.append(Control(consumer, "threads", 4))
    ready = threading.Event()
    consumer.on_ready = ready.set
    pool.start()
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    assert ready.wait(15), "the consumer did not start"
    until(lambda: control.ping([HOST], timeout=0.5))  # its control queue is bound
    try:
        yield consumer
    finally:
        for gate in tasks.gates.values():
            gate.set()
        consumer.stopping = True
        thread.join(15)
        pool.stop()
        tasks.gates.clear()


def test_ping_answers_by_name_and_only_when_addressed(running: Consumer) -> None:
    assert control.ping() == {HOST: {"ok": "pong"}}
    assert control.ping([HOST]) == {HOST: {"ok": "pong"}}
    started = time.monotonic()
    assert control.ping(["someone-else@nowhere"], timeout=0.5) == {}
    assert time.monotonic() - started >= 0.5


def test_inspect_active_reserved_scheduled_registered_stats(
        running: Consumer, qname: str) -> None:  # noqa: F811
    done = publish(qname)  # multiply(2, 3): counted in stats once it ran
    until(lambda: running.tally.processed == 1)
    holding = [publish(qname, name="tests.tasks.hold", args=[f"g{i}"]) for i in range(3)]
    later = message.TaskMessage(id=message.new_id(), name="tests.tasks.multiply", args=[1, 1],
                                kwargs={}, queue=qname,
                                eta=timezone.now() + timedelta(seconds=30))
    body, headers, props = message.encode(later)
    broker.publisher().publish(body, headers, props, qname)

    active = until(lambda: len(control.inspect("active")[HOST]) == 2
                   and control.inspect("active")[HOST])
    assert {a["id"] for a in active} <= {m.id for m in holding}
    assert all(a["name"] == "tests.tasks.hold" and a["hostname"] == HOST
               and a["delivery_info"]["routing_key"] == qname for a in active)
    reserved = control.inspect("reserved")[HOST]
    assert [r["id"] for r in reserved] == [m.id for m in holding
                                          if m.id not in {a["id"] for a in active}]
    scheduled = until(lambda: control.inspect("scheduled")[HOST])
    assert [s["request"]["id"] for s in scheduled] == [later.id]
    assert scheduled[0]["eta"] == later.eta.isoformat()  # type: ignore[union-attr]
    assert "tests.tasks.multiply" in control.inspect("registered")[HOST]

    stats = control.inspect("stats")[HOST]
    assert stats["total"]["tests.tasks.multiply"] == 1
    assert stats["total"]["tests.tasks.hold"] == 2
    assert stats["pool"]["max-concurrency"] == 2
    assert stats["processed"] == 1 and stats["failed"] == 0
    assert "password" not in json.dumps(stats["broker"])
    queues = control.inspect("active_queues")[HOST]
    assert [q["name"] for q in queues] == [qname]
    assert TaskResult.objects.get(task_id=done.id).status == TaskState.SUCCESS


def test_revoke_reaches_the_running_worker_and_is_stored(
        running: Consumer, qname: str) -> None:  # noqa: F811
    later = message.TaskMessage(id=message.new_id(), name="tests.tasks.multiply", args=[7, 7],
                                kwargs={}, queue=qname,
                                eta=timezone.now() + timedelta(seconds=1.5))
    body, headers, props = message.encode(later)
    broker.publisher().publish(body, headers, props, qname)
    until(lambda: control.inspect("scheduled")[HOST])
    replies = control.revoke([later.id])
    assert replies == {HOST: {"ok": f"tasks {later.id} flagged as revoked"}}
    assert later.id in control.inspect("revoked")[HOST]
    row = TaskResult.objects.get(task_id=later.id)
    assert row.status == TaskState.REVOKED
    time.sleep(2.5)  # past its eta: released, and dropped rather than run
    assert running.tally.total["tests.tasks.multiply"] == 0
    assert control.inspect("scheduled")[HOST] == []
    assert TaskResult.objects.get(task_id=later.id).status == TaskState.REVOKED


def test_celery_inspect_reaches_our_worker(running: Consumer,
                                           target: tuple[str, dict[str, Any]]) -> None:  # noqa: F811
    url, _ = target
    if url.startswith("django://"):
        pytest.skip("Celery has no django:// transport; its tools reach us on Redis and AMQP")
    from celery import Celery

    app = Celery(broker=url)
    try:
        inspect = app.control.inspect(timeout=1, destination=[HOST])
        assert inspect.ping() == {HOST: {"ok": "pong"}}
        assert "tests.tasks.multiply" in inspect.registered()[HOST]
        assert inspect.stats()[HOST]["pool"]["max-concurrency"] == 2
    finally:
        app.close()


def test_a_celery_worker_starting_beside_ours_syncs_revoked_ids(
        running: Consumer, target: tuple[str, dict[str, Any]]) -> None:  # noqa: F811
    url, _ = target
    if url.startswith("django://"):
        pytest.skip("Celery has no django:// transport")
    from celery import Celery

    running.revoke({"revoked-here"})
    app = Celery(broker=url)
    try:
        # What a Celery worker's "mingle" step sends at start-up, and reads back.
        replies = app.control.inspect(timeout=1, destination=[HOST]).hello(
            "celery@elsewhere", {"revoked-there": time.time()})
        assert set(replies[HOST]["revoked"]) == {"revoked-here", "revoked-there"}
        assert all(isinstance(at, float) for at in replies[HOST]["revoked"].values())
        assert replies[HOST]["clock"] == 0
        assert "revoked-there" in running.revoked
        # Its own greeting, sent back to it, is answered with nothing (as a Celery worker does).
        assert app.control.inspect(timeout=0.5, destination=[HOST]).hello(HOST) == {HOST: None}
    finally:
        app.close()


def test_queue_lengths_and_purge(qname: str) -> None:  # noqa: F811
    for _ in range(3):
        publish(qname)
    missing = f"{qname}-missing"
    sizes = control.queue_lengths([qname, missing])
    assert sizes[qname] == 3
    assert sizes[missing] in (None, 0)  # virtual transports have every queue, empty
    assert control.purge([qname]) == {qname: 3}
    assert control.queue_lengths([qname]) == {qname: 0}


def _taskctl(*args: str) -> str:
    out = io.StringIO()
    call_command("taskctl", *args, stdout=out)
    return out.getvalue()


def test_taskctl_ping_and_inspect_as_text_and_json(running: Consumer) -> None:
    assert f"-> {HOST}: OK pong" in _taskctl("ping")
    assert json.loads(_taskctl("ping", "--json")) == {HOST: {"ok": "pong"}}
    assert "tests.tasks.multiply" in _taskctl("inspect", "registered")
    assert json.loads(_taskctl("inspect", "stats", "--json"))[HOST]["pool"]["max-concurrency"] == 2


def test_taskctl_ping_fails_when_no_worker_answers(qname: str) -> None:  # noqa: F811
    with pytest.raises(CommandError, match="No worker answered within 0.3s") as caught:
        _taskctl("ping", "--timeout", "0.3")
    assert caught.value.returncode == 2
    with pytest.raises(CommandError, match="No worker of nobody@x answered"):
        _taskctl("inspect", "active", "--timeout", "0.3", "-d", "nobody@x")


def test_taskctl_queues_and_purge_asks_first(
        qname: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    publish(qname)
    publish(qname)
    assert json.loads(_taskctl("queues", qname, "--json")) == {qname: 2}
    assert f"{qname}  2" in _taskctl("queues", qname)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    with pytest.raises(CommandError, match="add --yes"):
        _taskctl("purge", qname)  # not a terminal: no prompt, nothing purged
    assert control.queue_lengths([qname]) == {qname: 2}
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(CommandError, match="Nothing purged"):
        _taskctl("purge", qname)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert f"Purged 2 message(s) from {qname}." in _taskctl("purge", qname)
    publish(qname)
    assert json.loads(_taskctl("purge", qname, "--yes", "--json")) == {qname: 1}


def test_taskctl_reports_an_unreachable_broker(settings: Any) -> None:
    settings.TASKS_Q = {"BROKER_URL": "redis://:secret@127.0.0.1:1/0"}
    with pytest.raises(CommandError, match="Cannot reach the broker") as caught:
        _taskctl("ping")
    assert "secret" not in str(caught.value)
    with pytest.raises(CommandError, match="Cannot reach the broker"):
        _taskctl("queues")


def test_leases_are_renewed_at_once_while_the_channel_waits_for_messages(
        running: Consumer, qname: str, redis_url: str) -> None:  # noqa: F811
    if not broker.safe_url().startswith("redis"):
        pytest.skip("leases are renewed on Redis only")
    import redis

    held = publish(qname, name="tests.tasks.hold", args=["lease"])
    until(lambda: running.pool.active())
    client = redis.Redis.from_url(redis_url)
    tag = running.pool.active()[0].message.delivery_tag
    # Every queue is empty: the channel waits in BRPOP, a second at a time. A renewal sent on
    # its connection would wait for the BRPOP to return; at a few moments within that second
    # it must return at once every time.
    for pause in (0.35, 0.3, 0.25, 0.2, 0.15):
        time.sleep(pause)
        before = client.zscore("unacked_index", tag)
        assert before is not None
        started = time.monotonic()
        running._keep_leases()
        assert time.monotonic() - started < 0.1
        assert client.zscore("unacked_index", tag) > before
    tasks.gates["lease"].set()
    until(lambda: running.tally.processed == 1)
    assert held.id not in {job.msg.id for job in running.pool.active()}
