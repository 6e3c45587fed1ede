"""taskbeat's logic with an injected clock: each slot sent once, leases, edits, missed slots."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import IntegrityError

from django_tasks_q import beat
from django_tasks_q.exceptions import EnqueueError
from django_tasks_q.models import PeriodicRun, PeriodicTask, QueueMessage, SchedulerLease

pytestmark = pytest.mark.django_db(transaction=True)

T0 = datetime(2026, 6, 1, 10, 0, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def embedded_broker(settings: Any) -> None:
    # Messages become rows of this database: what was sent can be counted and read.
    settings.TASKS_Q = {**settings.TASKS_Q, "BROKER_URL": "django://", "TIMEZONE": "UTC"}


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def schedule(name: str = "every-minute", next_run_at: datetime | None = None,
             **fields: Any) -> PeriodicTask:
    fields.setdefault("task", "tests.tasks.multiply")
    if not {"crontab", "interval", "run_at"} & set(fields):
        fields["crontab"] = "* * * * *"
    row = PeriodicTask.objects.create(name=name, **fields)
    if next_run_at is not None:
        PeriodicTask.objects.filter(pk=row.pk).update(next_run_at=next_run_at)
    return PeriodicTask.objects.get(pk=row.pk)


def sent() -> list[dict[str, Any]]:
    """The messages published so far: their headers, oldest first."""
    return [json.loads(row.payload)["headers"] for row in QueueMessage.objects.order_by("id")]


def test_each_due_slot_is_sent_once_on_time() -> None:
    clock = Clock()
    schedule(next_run_at=datetime(2026, 6, 1, 10, 1, tzinfo=UTC), args=[6, 7], queue="high")
    b = beat.Beat("b1", clock=clock)
    assert b.tick() == []
    clock.now = datetime(2026, 6, 1, 10, 1, 0, 200_000, tzinfo=UTC)
    [first] = b.tick()
    assert first.slot == datetime(2026, 6, 1, 10, 1, tzinfo=UTC)
    assert b.tick() == []
    clock.advance(minutes=1)
    [second] = b.tick()
    assert second.slot == datetime(2026, 6, 1, 10, 2, tzinfo=UTC)
    headers = sent()
    assert [h["id"] for h in headers] == [first.task_id, second.task_id]
    assert headers[0]["task"] == "tests.tasks.multiply"
    assert headers[0]["periodic_task_name"] == "every-minute"
    row = PeriodicTask.objects.get()
    assert row.total_run_count == 2 and row.last_run_at == clock.now
    assert row.next_run_at == datetime(2026, 6, 1, 10, 3, tzinfo=UTC)
    assert QueueMessage.objects.filter(queue="high").count() == 2
    assert list(PeriodicRun.objects.values_list("slot", flat=True)) == [second.slot, first.slot]


def test_two_schedulers_ticking_at_once_send_a_slot_once() -> None:
    clock = Clock(datetime(2026, 6, 1, 10, 1, 1, tzinfo=UTC))
    schedule(next_run_at=datetime(2026, 6, 1, 10, 1, tzinfo=UTC))
    one, two = beat.Beat("one", clock=clock), beat.Beat("two", clock=clock)
    rows_read_by_two = list(PeriodicTask.objects.all())  # as if two read before one wrote
    assert len(one.tick()) == 1
    assert two._tick_one(rows_read_by_two[0], clock.now) is None
    assert len(sent()) == 1 and PeriodicRun.objects.count() == 1


def test_a_slot_recorded_already_is_not_sent_again_and_the_schedule_moves_on() -> None:
    slot = datetime(2026, 6, 1, 10, 1, tzinfo=UTC)
    row = schedule(next_run_at=slot)
    PeriodicRun.objects.create(periodic_task=row, slot=slot, task_id="sent-before")
    assert beat.Beat("b", clock=Clock(slot + timedelta(seconds=1))).tick() == []
    assert sent() == []
    assert PeriodicTask.objects.get().next_run_at == slot + timedelta(minutes=1)


def test_an_edit_between_reading_and_sending_wins() -> None:
    clock = Clock(datetime(2026, 6, 1, 10, 1, 1, tzinfo=UTC))
    stale = schedule(next_run_at=datetime(2026, 6, 1, 10, 1, tzinfo=UTC))
    fresh = PeriodicTask.objects.get(pk=stale.pk)
    fresh.crontab = "0 12 * * *"
    fresh.save()  # the timetable changed: next run worked out again
    assert fresh.next_run_at is not None
    assert (fresh.next_run_at.hour, fresh.next_run_at.minute) == (12, 0)
    assert beat.Beat("b", clock=clock)._tick_one(stale, clock.now) is None
    assert sent() == []
    assert PeriodicTask.objects.get().crontab == "0 12 * * *"


def test_a_disabled_schedule_sends_nothing_and_reenabled_starts_afresh() -> None:
    clock = Clock(datetime(2026, 6, 1, 10, 1, 1, tzinfo=UTC))
    row = schedule(next_run_at=datetime(2026, 6, 1, 10, 1, tzinfo=UTC))
    row.enabled = False
    row.save()
    assert beat.Beat("b", clock=clock).tick() == [] and sent() == []
    row.enabled = True
    row.save()
    assert row.next_run_at is not None and row.next_run_at > datetime.now(UTC)


def test_missed_slots_run_once_or_are_skipped_as_each_schedule_says() -> None:
    missed_since = datetime(2026, 6, 1, 4, 0, tzinfo=UTC)
    schedule("hourly-once", next_run_at=missed_since, crontab="0 * * * *")
    schedule("hourly-skip", next_run_at=missed_since, crontab="0 * * * *",
             catch_up=PeriodicTask.CatchUp.SKIP)
    clock = Clock(datetime(2026, 6, 1, 9, 30, tzinfo=UTC))  # six slots missed
    done = beat.Beat("b", clock=clock).tick()
    assert [(d.name, d.slot) for d in done] == [("hourly-once", missed_since)]
    assert set(PeriodicTask.objects.values_list("next_run_at", flat=True)) == {
        datetime(2026, 6, 1, 10, 0, tzinfo=UTC)}


def test_an_interval_keeps_its_grid_and_a_one_off_runs_once_then_is_disabled() -> None:
    clock = Clock()
    schedule("every-10s", next_run_at=T0, interval=timedelta(seconds=10))
    schedule("once", run_at=T0 + timedelta(seconds=5), expires=timedelta(seconds=30))
    b = beat.Beat("b", clock=clock)
    assert [d.name for d in b.tick()] == ["every-10s"]
    clock.advance(seconds=6)
    assert [d.name for d in b.tick()] == ["once"]
    clock.advance(seconds=5)
    assert [d.name for d in b.tick()] == ["every-10s"]
    once = PeriodicTask.objects.get(name="once")
    assert not once.enabled and once.next_run_at is None and once.total_run_count == 1
    expires = [h["expires"] for h in sent() if h["periodic_task_name"] == "once"]
    assert expires == [(T0 + timedelta(seconds=35)).isoformat()]
    assert PeriodicTask.objects.get(name="every-10s").next_run_at == T0 + timedelta(seconds=20)


def test_a_row_that_is_not_a_schedule_is_reported_once_and_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(datetime(2026, 6, 1, 10, 1, 1, tzinfo=UTC))
    schedule("good", next_run_at=datetime(2026, 6, 1, 10, 1, tzinfo=UTC))
    bad = schedule("bad", next_run_at=datetime(2026, 6, 1, 10, 1, tzinfo=UTC))
    PeriodicTask.objects.filter(pk=bad.pk).update(interval=timedelta(seconds=5))
    b = beat.Beat("b", clock=clock)
    assert [d.name for d in b.tick()] == ["good"]
    b.tick()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["Periodic task 'bad' is not run: periodic task 'bad' needs exactly one of "
                      "crontab, interval and run_at; it has crontab, interval"]


def test_one_scheduler_leads_and_another_takes_over_when_it_stops_or_dies() -> None:
    clock = Clock()
    one, two = beat.Beat("one", clock=clock), beat.Beat("two", clock=clock)
    assert one.lead() and not two.lead()
    clock.advance(seconds=1)
    assert one.lead() and not two.lead()  # renewed
    one.resign()  # a clean stop: at once
    assert two.lead() and not one.lead()
    clock.advance(seconds=beat.LEASE_SECONDS + 0.1)  # two dies: its lease runs out
    assert one.lead()
    assert SchedulerLease.objects.get().holder == one.holder


def test_schedules_in_settings_are_synced_marked_as_code(settings: Any) -> None:
    schedule("made-in-the-admin")
    settings.TASKS_Q = {**settings.TASKS_Q, "BEAT_SCHEDULE": {
        "nightly": {"task": "tests.tasks.multiply", "schedule": "30 2 * * *", "args": [1, 2]},
        "every-5s": {"task": "tests.tasks.multiply", "schedule": 5, "queue": "low"},
    }}
    assert beat.sync_code_schedules() == 3  # with the built-in pruning
    rows = {r.name: r for r in PeriodicTask.objects.all()}
    assert rows["django_tasks_q.prune-results"].from_code
    assert rows["nightly"].from_code and rows["nightly"].crontab == "30 2 * * *"
    assert rows["every-5s"].interval == timedelta(seconds=5) and rows["every-5s"].queue == "low"
    assert not rows["made-in-the-admin"].from_code

    settings.TASKS_Q = {**settings.TASKS_Q, "BEAT_SCHEDULE": {
        "nightly": {"task": "tests.tasks.multiply", "schedule": "45 2 * * *"}}}
    assert beat.sync_code_schedules() == 2
    assert set(PeriodicTask.objects.values_list("name", flat=True)) == {
        "nightly", "made-in-the-admin", "django_tasks_q.prune-results"}
    assert PeriodicTask.objects.get(name="nightly").crontab == "45 2 * * *"


@pytest.mark.parametrize(("entry", "says"), [
    ({"schedule": 5}, 'must be a dict with a "task"'),
    ({"task": "t", "schedule": "0 0 * *"}, "has 4 field(s)"),
    ({"task": "t", "schedule": -1}, "must be a number of seconds"),
    ({"task": "t", "schedule": 5, "every": 2}, "unknown key(s) every"),
    ({"task": "t", "schedule": 5, "catch_up": "all"}, 'must be "once" or "skip"'),
])
def test_a_bad_schedule_in_settings_is_refused_saying_which_and_why(
        settings: Any, entry: dict[str, Any], says: str) -> None:
    settings.TASKS_Q = {**settings.TASKS_Q, "BEAT_SCHEDULE": {"broken": entry}}
    with pytest.raises(ValueError) as caught:
        beat.sync_code_schedules()
    assert """TASKS_Q["BEAT_SCHEDULE"]['broken']""" in str(caught.value)
    assert says in str(caught.value)


def test_a_slot_that_cannot_be_published_is_not_recorded_and_goes_at_the_next_tick(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    slot = datetime(2026, 6, 1, 10, 1, tzinfo=UTC)
    schedule(next_run_at=slot)
    b = beat.Beat("b", clock=Clock(slot + timedelta(seconds=1)))

    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise EnqueueError("Could not publish to redis://:**@127.0.0.1:1/0")

    monkeypatch.setattr(beat.client, "publish", broker_down)
    assert b.tick() == [] and b.tick() == []
    assert PeriodicRun.objects.count() == 0 and PeriodicTask.objects.get().next_run_at == slot
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "trying again every second" in warnings[0]
    monkeypatch.undo()
    [done] = b.tick()
    assert done.slot == slot and len(sent()) == 1


def test_a_schedule_another_taskbeat_creates_meanwhile_is_updated_not_duplicated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    save = beat._save_code_schedule
    raced: list[str] = []

    def racing(name: str, fields: dict[str, Any]) -> None:
        if not raced:  # the other taskbeat inserts it between our look and our insert
            raced.append(name)
            PeriodicTask.objects.create(name=name, task="other", interval=timedelta(hours=1),
                                        from_code=True)
            raise IntegrityError("duplicate key value violates unique constraint")
        save(name, fields)

    monkeypatch.setattr(beat, "_save_code_schedule", racing)
    assert beat.sync_code_schedules() == 1
    row = PeriodicTask.objects.get(name=raced[0])
    assert row.task == "django_tasks_q.prune_results" and row.crontab == "17 * * * *"
