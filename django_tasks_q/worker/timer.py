"""Processes: the worker's timer: calls on its event loop, once later, at a time, or repeatedly.

Worker extensions schedule on it (``worker.timer``). The consumer's event loop is rebuilt on
every reconnect; the timer keeps its entries and schedules them again on each new loop, so an
extension schedules once, in ``start()``. While the worker is disconnected the loop does not
turn and nothing is called: a call that fell due meanwhile runs once the worker is connected
again, a repeated one once, not once per missed interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from .. import broker

logger = logging.getLogger("django_tasks_q.worker")


class TimerEntry:
    """A call on the worker's timer; ``cancel()`` it to call it no more."""

    def __init__(self, timer: Timer, due: float, interval: float | None,
                 fun: Callable[..., Any], args: Sequence[Any],
                 kwargs: Mapping[str, Any] | None) -> None:
        self.timer = timer
        self.due = due  # time.monotonic() of the next call
        self.interval = interval  # seconds between calls; None: called once
        self.fun = fun
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.cancelled = False
        self._scheduled: Any = None  # the entry on the current event loop's timer

    def cancel(self) -> None:
        """Call it no more (a call running now finishes)."""
        self.cancelled = True
        self.timer._entries.discard(self)
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None

    def __repr__(self) -> str:
        every = f" every {self.interval:g}s" if self.interval is not None else ""
        return f"<TimerEntry {_name(self.fun)}{every}{' cancelled' if self.cancelled else ''}>"


class Timer:
    """Calls functions on the worker's event loop (``worker.timer``).

    The functions run between messages, like consumer callbacks: they must return quickly (a
    slow one holds up every task's dispatch and acknowledgement). One that raises is logged;
    a repeated one is called again at its next time. Schedule from the worker's own thread
    (``start()``, consumer callbacks, timer calls), not from task threads.
    """

    def __init__(self) -> None:
        self._entries: set[TimerEntry] = set()
        self._hub: Any = None

    def call_after(self, seconds: float, fun: Callable[..., Any], args: Sequence[Any] = (),
                   kwargs: Mapping[str, Any] | None = None) -> TimerEntry:
        """Call ``fun(*args, **kwargs)`` once, ``seconds`` from now."""
        if seconds < 0:
            raise ValueError(f"call_after() takes a number of seconds of 0 or more, not {seconds}")
        return self._add(time.monotonic() + seconds, None, fun, args, kwargs)

    def call_at(self, when: datetime | float, fun: Callable[..., Any], args: Sequence[Any] = (),
                kwargs: Mapping[str, Any] | None = None) -> TimerEntry:
        """Call ``fun(*args, **kwargs)`` once, at ``when``: an aware ``datetime`` or a Unix
        timestamp (``time.time()``); at once if it is past."""
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise ValueError("call_at() takes an aware datetime (such as "
                                 "django.utils.timezone.now() + timedelta(minutes=5)), or a "
                                 "Unix timestamp; a naive datetime has no single meaning")
            when = when.timestamp()
        return self._add(time.monotonic() + (float(when) - time.time()), None, fun, args, kwargs)

    def call_repeatedly(self, seconds: float, fun: Callable[..., Any],
                        args: Sequence[Any] = (),
                        kwargs: Mapping[str, Any] | None = None) -> TimerEntry:
        """Call ``fun(*args, **kwargs)`` every ``seconds``, the first time ``seconds`` from
        now."""
        if not seconds > 0:
            raise ValueError(f"call_repeatedly() takes a number of seconds above 0, not "
                             f"{seconds}")
        return self._add(time.monotonic() + seconds, float(seconds), fun, args, kwargs)

    @property
    def entries(self) -> list[TimerEntry]:
        """The entries not cancelled (nor called, for those called once), next due first."""
        return sorted(self._entries, key=lambda entry: entry.due)

    # -- the worker's side -------------------------------------------------------------------
    def attach(self, hub: Any) -> None:
        """The consumer (re)connected: schedule every entry on its new event loop ``hub``."""
        self._hub = hub
        for entry in self._entries:
            self._schedule(entry)

    def detach(self) -> None:
        """The event loop is gone (a reconnect, or shutdown): nothing is called until
        ``attach``."""
        self._hub = None
        for entry in self._entries:
            entry._scheduled = None

    def _add(self, due: float, interval: float | None, fun: Callable[..., Any],
             args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> TimerEntry:
        if not callable(fun):
            raise TypeError(f"the timer calls a function; {fun!r} is not callable")
        entry = TimerEntry(self, due, interval, fun, args, kwargs)
        self._entries.add(entry)
        if self._hub is not None:
            self._schedule(entry)
        return entry

    def _schedule(self, entry: TimerEntry) -> None:
        if entry._scheduled is not None:
            entry._scheduled.cancel()
        entry._scheduled = self._hub.call_later(max(0.0, entry.due - time.monotonic()),
                                                self._fire, entry)

    def _fire(self, entry: TimerEntry) -> None:
        entry._scheduled = None
        if entry.cancelled or self._hub is None:
            return
        try:
            entry.fun(*entry.args, **entry.kwargs)
        except Exception:  # noqa: BLE001 - an extension's error must not stop the event loop
            again = (f"; called again in {entry.interval:g}s"
                     if entry.interval is not None and not entry.cancelled else "")
            logger.exception("Timer call %s raised%s", _name(entry.fun), again)
        broker.flush_or_log()  # tasks it sent: see worker/extensions.py
        if entry.cancelled:
            return
        if entry.interval is None:
            self._entries.discard(entry)
            return
        now = time.monotonic()
        # The next time keeps its rhythm; one that fell behind skips the calls it missed.
        entry.due = entry.due + entry.interval
        if entry.due <= now:
            entry.due = now + entry.interval
        if self._hub is not None:
            self._schedule(entry)


def _name(fun: Callable[..., Any]) -> str:
    return getattr(fun, "__qualname__", None) or repr(fun)
