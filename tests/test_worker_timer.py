"""The worker's timer (``worker.timer``): calls once, at a time, repeatedly; across event loops."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from django_tasks_q.worker import timer as timer_module
from django_tasks_q.worker.timer import Timer


class Clock:
    """Stands in for the ``time`` module: both clocks move only when the test says."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


class Scheduled:
    def __init__(self, due: float, fun: Any, args: tuple[Any, ...]) -> None:
        self.due, self.fun, self.args, self.cancelled = due, fun, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeHub:
    """The part of kombu's Hub the timer uses; ``advance`` runs what falls due, in order."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.scheduled: list[Scheduled] = []

    def call_later(self, delay: float, fun: Any, *args: Any) -> Scheduled:
        entry = Scheduled(self.clock.mono + delay, fun, args)
        self.scheduled.append(entry)
        return entry

    def pending(self) -> list[float]:
        """Seconds from now of each live entry, soonest first."""
        return sorted(round(e.due - self.clock.mono, 6) for e in self.scheduled
                      if not e.cancelled)

    def advance(self, seconds: float) -> None:
        end = self.clock.mono + seconds
        while True:
            due = [e for e in self.scheduled if not e.cancelled and e.due <= end]
            if not due:
                break
            entry = min(due, key=lambda e: e.due)
            self.scheduled.remove(entry)
            step = max(0.0, entry.due - self.clock.mono)
            self.clock.mono += step
            self.clock.wall += step
            entry.fun(*entry.args)
        step = end - self.clock.mono
        self.clock.mono, self.clock.wall = end, self.clock.wall + step


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(timer_module, "time", fake)
    return fake


def test_call_after_calls_once_with_its_arguments(clock: Clock) -> None:
    hub, timer, calls = FakeHub(clock), Timer(), []
    timer.attach(hub)
    entry = timer.call_after(2.5, lambda *a, **k: calls.append((a, k)), (1, 2), {"x": 3})
    hub.advance(2.4)
    assert calls == []
    hub.advance(0.1)
    assert calls == [((1, 2), {"x": 3})]
    hub.advance(10)
    assert calls == [((1, 2), {"x": 3})]
    assert timer.entries == [] and not entry.cancelled


def test_call_at_takes_an_aware_datetime_or_a_timestamp(clock: Clock) -> None:
    hub, timer, calls = FakeHub(clock), Timer(), []
    timer.attach(hub)
    now = datetime.fromtimestamp(clock.wall, UTC)
    timer.call_at(now + timedelta(seconds=30), calls.append, ("datetime",))
    timer.call_at(clock.wall + 10, calls.append, ("timestamp",))
    timer.call_at(now - timedelta(hours=1), calls.append, ("past",))
    assert hub.pending() == [0.0, 10.0, 30.0]
    hub.advance(30)
    assert calls == ["past", "timestamp", "datetime"]
    with pytest.raises(ValueError, match="aware datetime"):
        timer.call_at(datetime(2030, 1, 1), calls.append)  # noqa: DTZ001 - the point


def test_call_repeatedly_keeps_its_rhythm_and_skips_what_it_missed(clock: Clock) -> None:
    hub, timer, calls = FakeHub(clock), Timer(), []
    timer.attach(hub)
    entry = timer.call_repeatedly(30, lambda: calls.append(clock.mono))
    hub.advance(95)
    assert calls == [1030.0, 1060.0, 1090.0]
    timer.detach()  # the loop stops turning for a while (a reconnect)...
    clock.mono += 100
    again = FakeHub(clock)
    timer.attach(again)  # ...then on a new loop: what it missed is made up for once
    again.advance(65)
    assert calls == [1030.0, 1060.0, 1090.0, 1195.0, 1225.0, 1255.0]
    entry.cancel()
    assert again.pending() == [] and timer.entries == []


def test_entries_move_to_each_new_event_loop(clock: Clock) -> None:
    timer, calls = Timer(), []
    once = timer.call_after(10, calls.append, ("once",))  # before any loop: kept until attach
    every = timer.call_repeatedly(4, calls.append, ("every",))
    first = FakeHub(clock)
    timer.attach(first)
    assert first.pending() == [4.0, 10.0]
    first.advance(5)
    assert calls == ["every"]
    timer.detach()
    clock.mono += 20  # disconnected: nothing is called
    clock.wall += 20
    second = FakeHub(clock)
    timer.attach(second)
    assert second.pending() == [0.0, 0.0]  # both fell due while disconnected
    second.advance(0)
    assert sorted(calls) == ["every", "every", "once"]
    assert second.pending() == [4.0]  # the repeated one goes on from now; the other is done
    assert timer.entries == [every] and once not in timer.entries


def test_a_call_that_raises_is_logged_and_a_repeated_one_goes_on(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    hub, timer, calls = FakeHub(clock), Timer(), []

    def check() -> None:
        calls.append(clock.mono)
        raise RuntimeError("the report service is down")

    timer.attach(hub)
    timer.call_repeatedly(1, check)
    with caplog.at_level(logging.ERROR, logger="django_tasks_q.worker"):
        hub.advance(2)
    assert calls == [1001.0, 1002.0]
    assert caplog.messages == [
        "Timer call test_a_call_that_raises_is_logged_and_a_repeated_one_goes_on.<locals>."
        "check raised; called again in 1s"] * 2
    assert "RuntimeError: the report service is down" in caplog.text


def test_a_cancelled_entry_is_not_called_even_from_its_own_call(clock: Clock) -> None:
    hub, timer, calls = FakeHub(clock), Timer(), []
    timer.attach(hub)

    def twice() -> None:
        calls.append("called")
        if len(calls) == 2:
            entry.cancel()

    entry = timer.call_repeatedly(1, twice)
    dropped = timer.call_after(1, calls.append, ("never",))
    dropped.cancel()
    hub.advance(10)
    assert calls == ["called", "called"]
    assert hub.pending() == [] and timer.entries == []


def test_bad_arguments_are_refused(clock: Clock) -> None:
    timer = Timer()
    with pytest.raises(ValueError, match="above 0"):
        timer.call_repeatedly(0, print)
    with pytest.raises(ValueError, match="0 or more"):
        timer.call_after(-1, print)
    with pytest.raises(TypeError, match="not callable"):
        timer.call_after(1, "print")  # type: ignore[arg-type]
