"""The admin dashboard through Django's test client, its data (monitor), and the heartbeat that
writes what it shows."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone
from kombu import Connection

from django_tasks_q import broker, monitor
from django_tasks_q.models import TaskCount, WorkerState
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.heartbeat import HEARTBEAT_INTERVAL, Heartbeat
from django_tasks_q.worker.main import Worker, WorkerOptions
from django_tasks_q.worker.pool import POOLS, Job
from django_tasks_q.worker.state import Watcher

from . import tasks
from .running import run_consumer

URL = "/admin/django_tasks_q/dashboard/"
DATA_URL = "/admin/django_tasks_q/dashboard/data/"
MEMORY = {"BROKER_URL": "memory://", "QUEUES": ["default", "high", "low"],
          "ENQUEUE_ON_COMMIT": False}


@pytest.fixture(autouse=True)
def _empty_queues() -> None:
    with Connection("memory://") as conn:
        for name in ("default", "high", "low", "extra"):
            broker.queue(name)(conn.default_channel).purge()


def staff(client: Client, *codenames: str) -> Client:
    user = User.objects.create_user("staff", "staff@example.com", "pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client.force_login(user)
    return client


def worker_row(hostname: str, seen: float, stopped: bool = False, **fields: Any) -> WorkerState:
    """A ``WorkerState`` row whose last heartbeat was ``seen`` seconds ago."""
    now = timezone.now()
    beat = now - timedelta(seconds=seen)
    values = {"pid": 4321, "pool": "prefork", "concurrency": 4, "queues": ["default"],
              "active": 1, "processed": 10, "failed": 2, "started_at": beat - timedelta(hours=1),
              "last_heartbeat": beat, "stopped_at": beat if stopped else None, **fields}
    return WorkerState.objects.create(hostname=hostname, **values)


# -- who sees it ----------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("codename", ["view_taskresult", "change_taskresult"])
def test_staff_who_may_see_task_results_see_the_dashboard_and_its_link(
        client: Client, settings: Any, codename: str) -> None:
    settings.TASKS_Q = MEMORY
    staff(client, codename)
    page = client.get(URL)
    assert page.status_code == 200
    assert "<h2>Workers</h2>" in page.content.decode()
    assert client.get(DATA_URL).status_code == 200
    # Listed, view only, in the admin's index and in the app's index.
    for index in ("/admin/", "/admin/django_tasks_q/"):
        html = client.get(index).content.decode()
        assert f'<a href="{URL}">Dashboard</a>' in html, index
        assert f'<a href="{URL}" class="viewlink"' in html, index
    assert "/admin/django_tasks_q/dashboard/add/" not in client.get("/admin/").content.decode()


@pytest.mark.django_db
def test_staff_without_permission_on_task_results_are_refused(client: Client) -> None:
    staff(client, "view_periodictask")
    assert client.get(URL).status_code == 403
    assert client.get(DATA_URL).status_code == 403
    assert URL not in client.get("/admin/").content.decode()


@pytest.mark.django_db
def test_anonymous_and_non_staff_users_are_sent_to_the_login_page(client: Client) -> None:
    assert client.get(DATA_URL)["Location"].startswith("/admin/login/")
    user = User.objects.create_user("shopper", "s@example.com", "pw")
    user.user_permissions.add(Permission.objects.get(codename="view_taskresult"))
    client.force_login(user)
    assert client.get(URL)["Location"].startswith("/admin/login/")


# -- workers --------------------------------------------------------------------------------

@pytest.mark.django_db
def test_online_and_offline_follow_the_heartbeat_and_a_clean_stop(
        client: Client, settings: Any) -> None:
    settings.TASKS_Q = MEMORY
    limit = monitor.OFFLINE_AFTER
    assert limit == 3 * HEARTBEAT_INTERVAL
    written = timezone.now()  # the rows' heartbeats are this much (or a hair less) ago
    worker_row("fresh@a", seen=1)
    worker_row("edge@a", seen=limit - 1)
    worker_row("late@a", seen=limit + 1)
    worker_row("stopped@a", seen=1, stopped=True)

    found = {w.hostname: w for w in monitor.workers()}
    assert {name: w.online for name, w in found.items()} == {
        "fresh@a": True, "edge@a": True, "late@a": False, "stopped@a": False}
    # Online ones first, each group by name.
    assert [w.hostname for w in monitor.workers()] == ["edge@a", "fresh@a", "late@a",
                                                       "stopped@a"]

    staff(client, "view_taskresult")
    # The pages see the clock as it was when the rows were written: however slow a first
    # admin request is, a worker a second inside the limit stays inside it.
    with mock.patch("django.utils.timezone.now", return_value=written):
        html = client.get(URL).content.decode()
        data = client.get(DATA_URL).json()
    assert '<tr data-hostname="fresh@a" class="dtq-online">' in html
    assert '<tr data-hostname="late@a" class="dtq-offline">' in html
    assert '<tr data-hostname="stopped@a" class="dtq-offline">' in html
    # Seconds since the beat, as the page was rendered.
    seen = re.search(r'<tr data-hostname="late@a" class="dtq-offline">.*?'
                     r'<td class="dtq-seen" title="([^"]+)">(\d+) s ago</td>\s*'
                     r'<td class="dtq-status">offline</td>', html, re.S)
    assert seen and seen[1] == found["late@a"].last_heartbeat.isoformat()
    assert limit + 1 <= int(seen[2]) <= limit + 5
    assert [(w["hostname"], w["online"]) for w in data["workers"]] == [
        ("edge@a", True), ("fresh@a", True), ("late@a", False), ("stopped@a", False)]


@pytest.mark.django_db
def test_the_json_has_workers_queues_and_sixty_minutes(client: Client, settings: Any) -> None:
    settings.TASKS_Q = MEMORY
    worker_row("w1@a", seen=2, queues=["default", "extra"])
    staff(client, "view_taskresult")
    data = client.get(DATA_URL).json()
    assert set(data) == {"now", "heartbeat_interval", "offline_after", "workers", "queues",
                         "minutes"}
    assert (data["heartbeat_interval"], data["offline_after"]) == (
        HEARTBEAT_INTERVAL, 3 * HEARTBEAT_INTERVAL)
    [worker] = data["workers"]
    assert worker["hostname"] == "w1@a" and worker["online"] is True
    assert {k: worker[k] for k in ("pid", "pool", "concurrency", "queues", "active",
                                   "processed", "failed", "stopped_at")} == {
        "pid": 4321, "pool": "prefork", "concurrency": 4, "queues": ["default", "extra"],
        "active": 1, "processed": 10, "failed": 2, "stopped_at": None}
    assert 1.5 <= worker["seen_ago"] < 10
    assert data["queues"] == {"broker": broker.safe_url(), "error": None, "sizes": [
        {"name": "default", "size": 0, "consumers": 1},
        {"name": "high", "size": 0, "consumers": 0},
        {"name": "low", "size": 0, "consumers": 0},
        {"name": "extra", "size": 0, "consumers": 1}]}
    assert len(data["minutes"]) == 60
    assert set(data["minutes"][0]) == {"minute", "processed", "failed"}


# -- tasks per minute -----------------------------------------------------------------------

@pytest.mark.django_db
def test_the_series_sums_workers_and_fills_the_gaps_with_zeros() -> None:
    now = timezone.now()
    current = monitor.minute_start(now)

    def count(worker: str, minutes_ago: int, processed: int, failed: int) -> None:
        TaskCount.objects.create(worker=worker, minute=current - timedelta(minutes=minutes_ago),
                                 processed=processed, failed=failed)

    count("a", 0, 5, 1)
    count("b", 0, 3, 0)
    count("a", 7, 2, 2)
    count("a", 59, 4, 0)
    count("a", 60, 100, 100)  # an hour ago: off the chart
    count("b", -1, 100, 100)  # a clock ahead of ours: not yet
    series = monitor.per_minute(now=now)
    assert len(series) == 60
    assert series[-1].start == current and series[0].start == current - timedelta(minutes=59)
    assert all(b.start - a.start == timedelta(minutes=1) for a, b in itertools.pairwise(series))
    busy = {(current - m.start) // timedelta(minutes=1): (m.processed, m.failed)
            for m in series if m.processed or m.failed}
    assert busy == {0: (8, 1), 7: (2, 2), 59: (4, 0)}


@pytest.mark.django_db
def test_the_page_lists_the_busy_minutes_without_javascript_and_embeds_the_data(
        client: Client, settings: Any) -> None:
    settings.TASKS_Q = MEMORY
    minute = monitor.minute_start(timezone.now()) - timedelta(minutes=3)
    TaskCount.objects.create(worker="a", minute=minute, processed=6, failed=2)
    staff(client, "view_taskresult")
    html = client.get(URL).content.decode()
    assert "6 processed, 2 failed" in html
    assert (f'<tr><td>{minute:%H:%M}</td><td class="dtq-num">6</td>'
            f'<td class="dtq-num">2</td></tr>') in html
    assert "django_tasks_q/dashboard.js" in html and "django_tasks_q/dashboard.css" in html
    assert "//cdn" not in html and "https://" not in html
    start = html.index('<script id="dtq-dashboard-data" type="application/json">')
    embedded = json.loads(html[html.index(">", start) + 1:html.index("</script>", start)])
    assert [m for m in embedded["minutes"] if m["processed"]] == [
        {"minute": minute.isoformat(), "processed": 6, "failed": 2}]


# -- queues ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_queue_lengths_on_memory(client: Client, settings: Any) -> None:
    settings.TASKS_Q = MEMORY
    for i in range(3):
        tasks.multiply.apply_async(args=(i, i), queue="high")
    tasks.multiply.delay(1, 1)
    worker_row("gone@a", seen=600, queues=["retired"])  # offline: its queue is not looked at
    lengths = monitor.queue_lengths(monitor.queue_names(monitor.workers()))
    assert (lengths.error, lengths.sizes) == (None, [("default", 1), ("high", 3), ("low", 0)])
    staff(client, "view_taskresult")
    html = client.get(URL).content.decode()
    assert ('<tr data-queue="high">\n  <td class="dtq-queue">high</td>\n'
            '  <td class="dtq-num dtq-size">3</td>') in html
    assert 'id="dtq-broker-error" class="errornote" hidden' in html


@pytest.mark.django_db(transaction=True)
def test_queue_lengths_on_the_embedded_broker(settings: Any) -> None:
    settings.TASKS_Q = {**MEMORY, "BROKER_URL": "django://"}
    for i in range(2):
        tasks.multiply.apply_async(args=(i, i), queue="low")
    lengths = monitor.queue_lengths(["default", "low"])
    assert (lengths.broker, lengths.error, lengths.sizes) == (
        broker.safe_url(), None, [("default", 0), ("low", 2)])


@pytest.mark.broker
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_queue_lengths_on_a_real_broker(request: pytest.FixtureRequest, settings: Any,
                                        kind: str) -> None:
    url = request.getfixturevalue(f"{kind}_url")
    settings.TASKS_Q = {"BROKER_URL": url, "QUEUES": ["dtq-dash"]}
    name = "dtq-dash"
    with broker.connection() as conn:
        broker.declare(conn, [name])
        channel = conn.channel()
        channel.queue_purge(name)
        for i in range(4):
            conn.Producer(channel).publish({"i": i}, exchange="", routing_key=name)
        try:
            lengths = monitor.queue_lengths([name, "dtq-never-declared"])
        finally:
            channel.queue_delete(name)
    # RabbitMQ knows which queues exist; on Redis an unknown queue is an empty one.
    missing = None if kind == "amqp" else 0
    assert (lengths.error, lengths.sizes) == (None, [(name, 4), ("dtq-never-declared", missing)])


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["redis://:s3cret-pw@127.0.0.1:1/0",
                                 "amqp://guest:s3cret-pw@127.0.0.1:1//"])
def test_an_unreachable_broker_is_shown_and_the_page_still_renders(
        client: Client, settings: Any, url: str) -> None:
    settings.TASKS_Q = {"BROKER_URL": url}
    worker_row("w1@a", seen=1)
    staff(client, "view_taskresult")
    page = client.get(URL)
    html = page.content.decode()
    assert page.status_code == 200
    assert "The broker cannot be reached, so queue lengths are unknown:" in html
    assert '<tr data-hostname="w1@a" class="dtq-online">' in html  # the rest is there
    data = client.get(DATA_URL).json()
    assert data["queues"]["error"] and data["queues"]["sizes"] == []
    assert data["queues"]["broker"] == broker.safe_url(url)
    assert "s3cret-pw" not in html and "s3cret-pw" not in json.dumps(data)


# -- the heartbeat --------------------------------------------------------------------------

class FakeHub:
    """Records what a watcher schedules (the consumer's hub runs it; here the test does)."""

    def __init__(self) -> None:
        self.repeated: list[tuple[float, Any]] = []

    def call_repeatedly(self, interval: float, callback: Any) -> None:
        self.repeated.append((interval, callback))


def new_consumer(hostname: str = "hb@test", pool: str = "solo", size: int = 1) -> Consumer:
    return Consumer(["default", "high"], POOLS[pool](size, hostname, on_done=lambda j, o: None),
                    hostname, prefetch=4)


def test_the_worker_has_a_heartbeat(settings: Any) -> None:
    settings.TASKS_Q = MEMORY
    worker = Worker(WorkerOptions(queues=["default"], concurrency=2, pool="threads"))
    [heartbeat] = [w for w in worker.consumer.watchers if isinstance(w, Heartbeat)]
    assert (heartbeat.consumer, heartbeat.pool, heartbeat.interval) == (
        worker.consumer, "threads", HEARTBEAT_INTERVAL)


@pytest.mark.django_db
def test_a_beat_writes_the_state_and_the_changed_minutes() -> None:
    consumer = new_consumer()
    heartbeat = Heartbeat(consumer, "solo")
    hub = FakeHub()
    heartbeat.attach(hub, None)
    assert [interval for interval, _ in hub.repeated] == [HEARTBEAT_INTERVAL]
    row = WorkerState.objects.get()  # written at once, not one interval later
    assert (row.hostname, row.pool, row.concurrency, row.queues, row.active, row.processed,
            row.stopped_at) == ("hb@test", "solo", 1, ["default", "high"], 0, 0, None)
    assert row.started_at <= row.last_heartbeat
    assert not TaskCount.objects.exists()

    tally = consumer.tally
    minute = int(timezone.now().timestamp()) // 60 * 60
    tally.processed, tally.failed = 7, 2
    tally.minutes = {minute - 60: [3, 1], minute: [4, 1]}
    hub.repeated[0][1]()  # the next beat
    row = WorkerState.objects.get()
    assert (row.processed, row.failed) == (7, 2)
    assert sorted(TaskCount.objects.values_list("worker", "processed", "failed")) == [
        ("hb@test", 3, 1), ("hb@test", 4, 1)]
    assert TaskCount.objects.get(processed=4).minute == monitor.at(minute)

    # Only changed minutes are written again: an edit of the older one stays.
    TaskCount.objects.filter(processed=3).update(failed=99)
    tally.minutes[minute] = [6, 1]
    heartbeat.beat()
    assert sorted(TaskCount.objects.values_list("processed", "failed")) == [(3, 99), (6, 1)]
    # Absolute values: writing the same again changes nothing.
    heartbeat._written.clear()
    heartbeat.beat()
    heartbeat.beat()
    assert sorted(TaskCount.objects.values_list("processed", "failed")) == [(3, 1), (6, 1)]

    heartbeat.close()
    row = WorkerState.objects.get()
    assert row.stopped_at is not None and row.stopped_at == row.last_heartbeat
    assert not monitor.workers()[0].online


@pytest.mark.django_db
def test_a_worker_that_never_connected_writes_nothing_at_shutdown() -> None:
    Heartbeat(new_consumer(), "threads").close()
    assert not WorkerState.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_failed_write_is_logged_once_and_retried_at_the_next_beat(
        caplog: pytest.LogCaptureFixture) -> None:
    consumer = new_consumer()
    heartbeat = Heartbeat(consumer, "threads")
    # A count the database refuses (its columns hold no negative numbers): a real failure.
    consumer.tally.processed = -1
    with caplog.at_level(logging.DEBUG, "django_tasks_q.worker"):
        heartbeat.attach(FakeHub(), None)
        heartbeat.beat()
        assert not WorkerState.objects.exists()
        consumer.tally.processed = 5
        heartbeat.beat()
    assert WorkerState.objects.get().processed == 5
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    failures = [level for level, text in said if "Could not write the worker's heartbeat" in text]
    assert failures == ["WARNING", "DEBUG"]
    assert ("WARNING", "The database is reachable again") in said
    assert "the worker goes on and retries" in next(text for _, text in said if "heartbeat" in text)


class RowSeen(Watcher):
    """Notes, as each task starts, whether the worker's row is there already."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.seen: list[bool] = []

    def started(self, job: Job) -> None:
        self.seen.append(WorkerState.objects.filter(hostname=self.hostname).exists())


@pytest.mark.django_db(transaction=True)
def test_a_real_consumer_beats_and_its_counts_reach_the_dashboard(settings: Any) -> None:
    settings.TASKS_Q = MEMORY
    consumer = new_consumer("real@test", "threads", 3)
    heartbeat = Heartbeat(consumer, "threads")
    seen = RowSeen("real@test")
    consumer.watchers += [heartbeat, seen]
    tasks.multiply.delay(2, 3)
    tasks.boom.delay("x")
    tasks.multiply.delay(4, 5)
    assert len(run_consumer(consumer, 3, timeout=15)) == 3
    heartbeat.close()  # as the worker does at shutdown

    assert seen.seen and all(seen.seen)  # written when the consumer connected
    row = WorkerState.objects.get(hostname="real@test")
    assert (row.processed, row.failed, row.active, row.pid) == (3, 1, 0, os.getpid())
    assert row.stopped_at is not None
    series = monitor.per_minute()  # one minute, or two when the run crossed into the next
    assert (sum(m.processed for m in series), sum(m.failed for m in series)) == (3, 1)


# -- pruning --------------------------------------------------------------------------------

@pytest.mark.django_db
def test_prune_drops_a_day_old_history_with_the_results() -> None:
    from django_tasks_q.tasks import prune_results

    now = timezone.now()
    worker_row("running@a", seen=1)
    worker_row("stopped-today@a", seen=3600, stopped=True)
    worker_row("gone@a", seen=2 * 86400, stopped=True)
    worker_row("vanished@a", seen=86400 + 60)  # killed: never said it stopped
    for hours in (1, 23, 25, 48):
        TaskCount.objects.create(worker="running@a", minute=now - timedelta(hours=hours))
    assert prune_results() == 0  # the results it returns: none here
    assert sorted(WorkerState.objects.values_list("hostname", flat=True)) == [
        "running@a", "stopped-today@a"]
    assert TaskCount.objects.count() == 2
    assert monitor.prune() == 0
