"""The prefork pool's autoscale: the option, the setting, and growing and shrinking (no broker)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from django_tasks_q import checks, conf, message
from django_tasks_q.execute import REQUEUE, Outcome
from django_tasks_q.management.commands import taskworker
from django_tasks_q.worker.main import Worker, WorkerOptions, parse_autoscale
from django_tasks_q.worker.pool import QUEUE_BEHIND_MOST, Job, PreforkPool

from . import tasks


@pytest.fixture(autouse=True)
def _keep_log_level() -> Iterator[None]:
    # taskworker sets the level of the package's loggers; leave them as other tests expect.
    logger = logging.getLogger("django_tasks_q")
    level = logger.level
    yield
    logger.setLevel(level)


# -- the option -----------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    ("10", "--autoscale takes MAX,MIN: two whole numbers separated by a comma"),
    ("a,b", "--autoscale takes MAX,MIN"),
    ("3,1,1", "--autoscale takes MAX,MIN"),
    ("3.5,1", "got '3.5,1'"),
    ("", "--autoscale takes MAX,MIN"),
    ("1,3", "--autoscale 1,3: MAX (1) is below MIN (3); the order is MAX,MIN, "
            "e.g. --autoscale 3,1"),
    ("3,-1", "--autoscale 3,-1: MIN must be 0 or more"),
    ("0,0", "--autoscale 0,0: MAX must be at least 1"),
])
def test_bad_autoscale_is_a_command_error(given: str, expected: str) -> None:
    with pytest.raises(CommandError) as raised:
        call_command("taskworker", autoscale=given)
    assert expected in str(raised.value)


@pytest.mark.parametrize(("pool", "runs"), [
    ("threads", "-P threads runs a fixed number of threads (-c)"),
    ("solo", "-P solo runs one task at a time"),
])
def test_autoscale_needs_the_prefork_pool(pool: str, runs: str) -> None:
    with pytest.raises(CommandError) as raised:
        call_command("taskworker", autoscale="4,2", pool=pool)
    assert str(raised.value) == (f"--autoscale 4,2 works with the prefork pool only; {runs}. "
                                 f"Use -P prefork, or drop --autoscale")


def test_parse_autoscale_reads_max_then_min() -> None:
    assert parse_autoscale(" 10, 3") == (10, 3)
    assert parse_autoscale("1,0") == (1, 0)


@override_settings(TASKS_Q={"BROKER_URL": "redis://127.0.0.1:1/0"})  # never connected
def test_autoscale_wins_over_concurrency_and_sizes_prefetch(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    built: list[Worker] = []

    def run(self: Worker) -> int:
        built.append(self)
        return 0

    monkeypatch.setattr(taskworker.Worker, "run", run)

    call_command("taskworker", autoscale="6,2", concurrency=3, prefetch_multiplier=2)

    [worker] = built
    assert (worker.pool.size, worker.pool.min_size, worker.pool.autoscale) == (6, 2, True)
    assert worker.consumer.prefetch == 12  # from MAX
    assert "-c/--concurrency 3 is ignored: --autoscale 6,2 sizes the pool" in caplog.text


@override_settings(TASKS_Q={"BROKER_URL": "redis://127.0.0.1:1/0"})
def test_without_autoscale_the_pool_has_a_fixed_size() -> None:
    worker = Worker(WorkerOptions(queues=["default"], concurrency=3))
    assert (worker.pool.size, worker.pool.min_size, worker.pool.autoscale) == (3, 3, False)


# -- the setting ----------------------------------------------------------------------------

def test_keepalive_defaults_to_thirty_seconds() -> None:
    with override_settings(TASKS_Q={}):
        assert conf.get().AUTOSCALE_KEEPALIVE == 30
        assert checks.check_settings() == []


@pytest.mark.parametrize("value", [0, -1, "30", None, True])
def test_bad_keepalive_is_an_error(value: Any) -> None:
    with override_settings(TASKS_Q={"AUTOSCALE_KEEPALIVE": value}):
        [error] = checks.check_settings()
    assert error.id == "django_tasks_q.E005" and "AUTOSCALE_KEEPALIVE" in error.msg


# -- growing and shrinking, with real children and a hub that is driven by hand -------------

class _Timer:
    def __init__(self, fun: Callable[[], None]) -> None:
        self.fun = fun
        self.canceled = False

    def cancel(self) -> None:
        self.canceled = True


class FakeHub:
    """What the pool uses of kombu's hub; readers and timers run only when a test says so."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        self.timers: list[_Timer] = []

    def add_reader(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self.readers[fd] = (callback, args)

    def remove(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_repeatedly(self, secs: float, fun: Callable[[], None], *args: Any) -> _Timer:
        timer = _Timer(fun)
        self.timers.append(timer)
        return timer

    def tick(self) -> None:
        for timer in self.timers:
            if not timer.canceled:
                timer.fun()

    def read(self, pid: int) -> None:
        """Take in what the child ``pid`` has sent (waiting for something): one read of its
        pipe, which may hold more than one outcome."""
        [(callback, args)] = [entry for entry in self.readers.values() if entry[1][0].pid == pid]
        callback(*args)


_others: set[int] = set()  # this process's children that are not the pool's


def live_children() -> set[int]:
    """The pool's children that have not exited."""
    return {kid.pid for kid in psutil.Process().children()
            if kid.status() != psutil.STATUS_ZOMBIE} - _others


def job() -> Job:
    return Job(message.TaskMessage(id=message.new_id(), name=tasks.quiet.name, args=[],
                                   kwargs={}), None)


@pytest.fixture
def outcomes() -> list[tuple[Job, Outcome]]:
    return []


@pytest.fixture
def pool(outcomes: list[tuple[Job, Outcome]]) -> Iterator[PreforkPool]:
    _others.clear()
    _others.update(live_children())
    with override_settings(TASKS_Q={"BROKER_URL": "redis://127.0.0.1:1/0",
                                    "AUTOSCALE_KEEPALIVE": 0.2}):
        scaled = PreforkPool(3, "t", on_done=lambda j, o: outcomes.append((j, o)), min_size=1)
        scaled.start()
    try:
        yield scaled
    finally:
        scaled.stop()


def grown(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Pool grew" in r.getMessage()]


@pytest.mark.django_db(transaction=True)
def test_grows_one_child_per_job_that_finds_every_child_busy(
        pool: PreforkPool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "django_tasks_q")
    pool.register(FakeHub())
    [first] = live_children()
    assert pool.free() == 3  # one idle child, room for two more

    pool.submit(job())  # the idle child takes it: no growing
    assert grown(caplog) == [] and pool.free() == 2
    pool.submit(job())
    assert grown(caplog) == ["Pool grew to 2 children (autoscale 1..3)"]
    pool.submit(job())
    assert grown(caplog)[1:] == ["Pool grew to 3 children (autoscale 1..3)"]
    assert pool.free() == 0  # at MAX
    running = {j.pid for j in pool.active()}
    assert len(running) == 3 and first in running and running == live_children()


@pytest.mark.django_db(transaction=True)
def test_a_failed_fork_gives_the_job_back_and_pauses_growing(
        pool: PreforkPool, outcomes: list[tuple[Job, Outcome]],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    pool.register(FakeHub())
    pool.submit(job())

    def refuse() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr("django_tasks_q.worker.pool.os.fork", refuse)
    second = job()
    pool.submit(second)

    [(back, outcome)] = outcomes
    assert back is second and outcome.status == REQUEUE
    assert pool.free() == 0  # no growing for a while: the job waits for the busy child
    assert "Pool could not grow beyond 1 child" in caplog.text
    assert len(live_children()) == 1


@pytest.mark.django_db(transaction=True)
def test_shrinks_idle_children_after_the_keepalive_never_busy_ones_nor_below_min(
        pool: PreforkPool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "django_tasks_q")
    hub = FakeHub()
    pool.register(hub)
    for _ in range(3):
        pool.submit(job())
    first, second, third = (j.pid for j in pool.active())
    assert first is not None and second is not None and third is not None

    hub.read(first)  # only the first child is idle now
    time.sleep(0.3)
    hub.tick()
    assert {j.pid for j in pool.active()} == {second, third}
    assert _exits(first)  # the idle child was let go; the busy ones stay
    assert pool.free() == 1  # room to fork one again

    hub.read(second)
    hub.read(third)
    hub.tick()  # idle, but not for the keepalive yet
    assert live_children() == {second, third}
    time.sleep(0.3)
    hub.tick()
    hub.tick()
    assert _exits(second) and live_children() == {third}  # the one idle longest went; MIN stays
    shrank = [r.getMessage().split(" was idle for ")[0] for r in caplog.records
              if "Pool shrank" in r.getMessage()]
    assert shrank == [f"Pool shrank to 2 children (autoscale 1..3): pool child {first}",
                      f"Pool shrank to 1 child (autoscale 1..3): pool child {second}"]


def _exits(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid in live_children():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.django_db(transaction=True)
def test_register_again_replaces_the_idle_check(pool: PreforkPool) -> None:
    old, new = FakeHub(), FakeHub()
    pool.register(old)
    pool.register(new)
    assert [t.canceled for t in old.timers] == [True]
    assert [t.canceled for t in new.timers] == [False]
    pool.stop()
    assert new.timers[0].canceled


# -- short tasks queued behind one another in a busy child ----------------------------------

def run_job(name: str, *args: Any) -> Job:
    return Job(message.TaskMessage(id=message.new_id(), name=name, args=list(args), kwargs={}),
               None)


@pytest.fixture
def single(outcomes: list[tuple[Job, Outcome]]) -> Iterator[tuple[PreforkPool, FakeHub,
                                                                   list[Job]]]:
    """A pool of one child (its gate "open" lets ``hold`` return at once), driven by hand."""
    _others.clear()
    _others.update(live_children())
    tasks.gates.setdefault("open", threading.Event()).set()
    returned: list[Job] = []
    with override_settings(TASKS_Q={"BROKER_URL": "redis://127.0.0.1:1/0"}):
        one = PreforkPool(1, "t", on_done=lambda j, o: outcomes.append((j, o)))
        one.start()
    one.on_return = returned.append
    hub = FakeHub()
    one.register(hub)
    try:
        yield one, hub, returned
    finally:
        one.kill()


@pytest.mark.django_db(transaction=True)
def test_a_short_task_waits_in_a_busy_child_behind_another_and_runs_next(
        single: tuple[PreforkPool, FakeHub, list[Job]],
        outcomes: list[tuple[Job, Outcome]]) -> None:
    pool, hub, _ = single
    [pid] = live_children()
    first = run_job(tasks.add.name, 1, 2)
    assert pool.takes(first)
    pool.submit(first)
    assert not pool.takes(run_job(tasks.add.name, 0, 0))  # how long it takes is not known yet
    hub.read(pid)

    running = run_job(tasks.add.name, 2, 3)
    pool.submit(running)
    behind = [run_job(tasks.add.name, n, 4) for n in range(QUEUE_BEHIND_MOST)]
    for job in behind:
        assert pool.takes(job)  # add took well under QUEUE_BEHIND_UNDER: they may wait
        pool.submit(job)
    assert pool.active() == [running, *behind]
    assert not pool.takes(run_job(tasks.add.name, 0, 0))  # QUEUE_BEHIND_MOST wait at most
    while len(outcomes) < 2 + QUEUE_BEHIND_MOST:  # several may come in one read of the pipe
        hub.read(pid)
    assert [(j, o.status) for j, o in outcomes] == [
        (j, "SUCCESS") for j in (first, running, *behind)]
    assert pool.active() == [] and pool.free() == 1


@pytest.mark.django_db(transaction=True)
def test_a_short_task_waits_in_the_busy_child_with_the_fewest_jobs(
        outcomes: list[tuple[Job, Outcome]]) -> None:
    _others.clear()
    _others.update(live_children())
    with override_settings(TASKS_Q={"BROKER_URL": "redis://127.0.0.1:1/0"}):
        pair = PreforkPool(2, "t", on_done=lambda j, o: outcomes.append((j, o)))
        pair.start()
    try:
        pair.register(FakeHub())
        pair._runtimes[tasks.add.name] = 0.001
        jobs = [run_job(tasks.add.name, n, n) for n in range(6)]
        for job in jobs:  # no outcome is taken in: every child stays busy
            pair.submit(job)
        first, second = jobs[0].pid, jobs[1].pid
        assert first != second
        assert [job.pid for job in jobs[2:]] == [first, second, first, second]
    finally:
        pair.kill()


@pytest.mark.django_db(transaction=True)
def test_nothing_waits_behind_a_task_that_is_not_short(
        single: tuple[PreforkPool, FakeHub, list[Job]]) -> None:
    pool, hub, _ = single
    [pid] = live_children()
    pool._runtimes[tasks.add.name] = 0.001
    pool._runtimes[tasks.total.name] = 0.050
    pool.submit(run_job(tasks.total.name, [1, 2]))
    assert not pool.takes(run_job(tasks.add.name, 1, 2))  # the running one is slow
    hub.read(pid)
    pool.submit(run_job(tasks.add.name, 1, 2))
    assert not pool.takes(run_job(tasks.total.name, [1]))  # the waiting one would be slow
    assert pool.takes(run_job(tasks.add.name, 1, 2))


@pytest.mark.django_db(transaction=True)
def test_a_task_waiting_in_a_child_that_dies_is_returned_not_lost(
        single: tuple[PreforkPool, FakeHub, list[Job]],
        outcomes: list[tuple[Job, Outcome]]) -> None:
    pool, hub, returned = single
    [pid] = live_children()
    pool.submit(run_job(tasks.hold.name, "open"))
    hub.read(pid)  # hold("open") returns at once: it is short
    running, waiting = run_job(tasks.hold.name, "shut"), run_job(tasks.hold.name, "open")
    pool.submit(running)
    pool.submit(waiting)
    os.kill(pid, signal.SIGKILL)
    hub.read(pid)  # end of file: the child is gone

    assert [(j, o.status) for j, o in outcomes[1:]] == [(running, "LOST")]
    assert returned == [waiting]  # it never started: it is not counted as a delivery
    assert pool.active() == [] and len(live_children()) == 1  # replaced
