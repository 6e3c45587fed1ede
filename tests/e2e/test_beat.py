"""End-to-end: several real taskbeat processes; each slot is sent once; a standby takes over."""

from __future__ import annotations

import signal
import time
from datetime import datetime

import pytest

from .conftest import Beat, Project, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

ADD = "testproject.testapp.tasks.add"
LEASE_SECONDS = 6.0  # django_tasks_q.beat.LEASE_SECONDS


@pytest.mark.parametrize("beats", [2, 3])
@pytest.mark.parametrize("project", ["redis", "django-pg"], indirect=True)
def test_several_beats_send_each_slot_once_and_a_standby_takes_over(project: Project,
                                                                    beats: int) -> None:
    project.producer.call("create_schedule", name="every-second", task=ADD, args=[1, 1],
                          interval=1.0, queue=project.queue)
    started: list[Beat] = [project.beat(ready=False) for _ in range(beats)]  # all at once
    for beat in started:
        beat.wait_ready()

    def runs() -> list[dict[str, str]]:
        return project.producer.call("periodic_runs", name="every-second")

    def leaders() -> list[Beat]:
        return [b for b in started if b.proc.poll() is None and b.leads]

    [leader] = wait_for(lambda: leaders() if len(leaders()) == 1 else None, 15, "one leader",
                        project.logs)
    wait_for(lambda: len(runs()) >= 5, 20, "five runs", project.logs)

    leader.signal(signal.SIGKILL)
    killed_at = time.time()
    assert leader.wait_exit(5) == -signal.SIGKILL
    before = len(runs())
    [successor] = wait_for(lambda: leaders() or None, LEASE_SECONDS + 10, "a new leader",
                           project.logs)
    assert successor is not leader
    wait_for(lambda: len(runs()) >= before + 5, 30, "five runs after the takeover",
             project.logs)
    for beat in started:
        if beat is not leader:
            beat.signal(signal.SIGTERM)
    for beat in started:
        if beat is not leader:
            assert beat.wait_exit(10) == 0

    sent = runs()
    ids = project.producer.call("drain_ids", queue=project.queue)
    assert sorted(ids) == sorted(r["task_id"] for r in sent), "a slot was published twice"
    slots = [r["slot"] for r in sent]
    assert len(set(slots)) == len(slots)
    after_kill = [datetime.fromisoformat(r["sent_at"]).timestamp() for r in sent
                  if datetime.fromisoformat(r["sent_at"]).timestamp() > killed_at]
    recovery = after_kill[0] - killed_at
    assert recovery < LEASE_SECONDS + 3, f"the standby took {recovery:.1f}s to send"
    print(f"\n{beats} beats on {project.broker}: {len(sent)} slots sent once each; "
          f"first slot after killing the leader sent {recovery:.1f}s later")


@pytest.mark.parametrize("project", ["django-sqlite"], indirect=True)
def test_a_worker_started_with_B_runs_the_schedules_itself(project: Project) -> None:
    project.producer.call("create_schedule", name="every-2s", task=ADD, args=[2, 3],
                          interval=2.0, queue=project.queue)
    worker = project.worker("-B", concurrency=1)

    def two_runs() -> list[dict[str, str]] | None:
        runs = project.producer.call("periodic_runs", name="every-2s")
        return runs if len(runs) >= 2 else None

    runs = wait_for(two_runs, 15, "two runs", project.logs)
    rows = project.wait_results([r["task_id"] for r in runs[:2]], timeout=10)
    assert [row["result"] for row in rows.values()] == [5, 5]
    assert worker.stop() == 0
    assert worker.count(r"beat@\S+ leads") == 1 and worker.count(r"beat@\S+ stopped") == 1


@pytest.mark.parametrize("project", ["redis"], indirect=True)
def test_edits_take_effect_within_two_seconds_without_an_extra_or_lost_run(
        project: Project) -> None:
    project.beat()

    def runs() -> list[dict[str, str]]:
        return project.producer.call("periodic_runs", name="edited")

    def sent_at(run: dict[str, str]) -> float:
        return datetime.fromisoformat(run["sent_at"]).timestamp()

    # A new schedule: an interval runs at once, then an hour later.
    created = time.time()
    project.producer.call("create_schedule", name="edited", task=ADD, args=[1, 2],
                          interval=3600.0, queue=project.queue)
    [first] = wait_for(lambda: runs() or None, 5, "the first run", project.logs)
    assert sent_at(first) - created < 2.0

    # A new time: every two seconds from now on, counted from the last run.
    changed = datetime.fromisoformat(
        project.producer.call("change_schedule", name="edited", interval=2.0)).timestamp()
    wait_for(lambda: len(runs()) >= 4, 15, "three runs at the new interval", project.logs)
    # Its first slot is at most two seconds after the change, and is sent on time (the
    # slot, not the send, is what the edit decides: a send lags its slot by a tick).
    second = runs()[1]
    slot = datetime.fromisoformat(second["slot"]).timestamp()
    assert slot - changed <= 2.0
    assert 0.0 <= sent_at(second) - slot < 1.0

    # Disabled: nothing more, not even from a tick already under way.
    disabled = datetime.fromisoformat(
        project.producer.call("change_schedule", name="edited", enabled=False)).timestamp()
    time.sleep(4)
    sent = runs()
    assert all(sent_at(r) <= disabled for r in sent), "a run was sent after disabling"
    slots = [datetime.fromisoformat(r["slot"]) for r in sent[1:]]
    assert {(b - a).total_seconds() for a, b in zip(slots, slots[1:], strict=False)} == {2.0}
    ids = project.producer.call("drain_ids", queue=project.queue)
    assert sorted(ids) == sorted(r["task_id"] for r in sent)
