"""Fault injection: pool children and workers killed or stopped mid-stream, on every broker.

Each scenario sends a stream of ledger tasks to a prefork worker (two children), hits it while
tasks are both running and waiting, lets a worker (the same one or a new one) finish, and then
counts from the ledger: nothing may be lost; what may run twice depends on the fault.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from . import ledger
from .conftest import STOP_TIMEOUT, Harness

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.broker]


def test_pool_child_killed_mid_task_is_replaced_and_the_task_runs_again(
        fault: Harness) -> None:
    worker = fault.worker(ready=False)
    ids = fault.send(30, 0.3)
    worker.wait_ready()
    fault.wait_finished(4)
    children = {p.pid for p in psutil.Process(worker.pid).children()}

    victim = fault.running_child(worker, max_age=0.1)  # a 0.3 s run: still running when hit
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)

    row = fault.conclude("child SIGKILL", ids, killed_at, until={victim.task_id})
    records = fault.records()
    runs = [r for r in records if r.task_id == victim.task_id]
    assert [r.kind for r in runs] == ["start", "start", "finish"], runs
    assert runs[-1].pid != victim.pid
    # Only the killed run is repeated; nothing finished twice.
    assert (row.dup_starts, row.dup_finishes) == (1, 0), fault.project.logs()
    assert worker.count(rf"Pool child {victim.pid} died \(signal SIGKILL\) while running "
                        rf"\S+\[{victim.task_id}\]") == 1
    # The parent lived on and replaced the child: later tasks ran in a child it did not have.
    assert worker.proc.returncode == 0, "the worker did not survive its child's death"
    new_pids = {r.pid for r in records if r.at > killed_at} - children
    assert new_pids, "no replacement child ran anything"


def test_worker_killed_with_tasks_queued_and_in_flight_loses_none(fault: Harness) -> None:
    fault.short_leases()
    doomed = fault.worker(ready=False)
    ids = fault.send(40, 0.2)
    doomed.wait_ready()
    fault.wait_finished(6)
    children = psutil.Process(doomed.pid).children()

    killed_at = time.time()
    doomed.signal(signal.SIGKILL)  # the parent only: its children must die with it
    doomed.wait_exit(5)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"pool children outlived their SIGKILLed parent: {alive}"
    # Read once every child is dead: exactly the runs the kill cut off.
    pids = {p.pid for p in children}
    in_flight = {r.task_id for r in ledger.running(fault.records()) if r.pid in pids}

    fault.worker(ready=False)  # the replacement, as a supervisor would start it
    row = fault.conclude("worker SIGKILL", ids, killed_at)
    records = fault.records()
    for task_id in in_flight:  # cut off mid-run: started again, finished once at least
        kinds = [r.kind for r in records if r.task_id == task_id]
        assert kinds.count("start") >= 2 and "finish" in kinds, (task_id, kinds)
    assert row.dup_starts >= len(in_flight)


def test_warm_shutdown_mid_stream_loses_nothing_and_runs_nothing_twice(
        fault: Harness) -> None:
    first = fault.worker(ready=False)
    ids = fault.send(30, 0.3)
    first.wait_ready()
    fault.wait_finished(6)
    running = fault.running_child(first)

    stopped_at = time.time()
    first.signal(signal.SIGTERM)
    assert first.wait_exit(STOP_TIMEOUT) == 0
    # The task running at the SIGTERM was finished by the stopping worker itself.
    assert any(r.kind == "finish" and r.task_id == running.task_id and r.pid == running.pid
               for r in fault.records())

    fault.worker(ready=False)
    row = fault.conclude("warm shutdown", ids, stopped_at)
    assert (row.dup_starts, row.dup_finishes) == (0, 0), fault.project.logs()
    assert first.count(r"Warm shutdown \(SIGTERM\)") == 1


def test_cold_shutdown_mid_stream_loses_nothing(fault: Harness) -> None:
    first = fault.worker(ready=False)
    ids = fault.send(30, 0.4)
    first.wait_ready()
    fault.wait_finished(6)
    fault.running_child(first)
    children = psutil.Process(first.pid).children()

    stopped_at = time.time()
    first.signal(signal.SIGTERM)
    # Two signals sent too close together merge into one: the second waits for the first.
    first.wait_log(r"Warm shutdown \(SIGTERM\)")
    first.signal(signal.SIGTERM)
    first.wait_log(r"Cold shutdown")
    assert first.wait_exit(STOP_TIMEOUT) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"pool children outlived the cold shutdown: {alive}"

    fault.worker(ready=False)
    # Duplicates are allowed (the running tasks were cut off and given back); losses are not.
    fault.conclude("cold shutdown", ids, stopped_at)
