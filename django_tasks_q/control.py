"""API: remote control from outside the workers: ping, inspect, revoke, queue lengths, purge."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from kombu.connection import Connection

from . import broker, conf
from .exceptions import TasksQError

#: Seconds to collect replies for, unless told otherwise.
DEFAULT_TIMEOUT = 1.0
#: The ``inspect`` commands ``taskctl`` offers (the workers answer a few more; see
#: worker/control.py).
INSPECT = ("active", "reserved", "scheduled", "registered", "stats", "active_queues", "revoked",
           "conf")


class BrokerUnreachable(TasksQError):
    """The broker did not answer: nothing could be asked or done."""


#: Seconds to wait for the broker to accept a connection.
CONNECT_TIMEOUT = 2


@contextlib.contextmanager
def _connected() -> Iterator[Connection]:
    cfg = conf.get()
    options = dict(cfg.BROKER_OPTIONS)
    if cfg.BROKER_URL.startswith(("redis://", "rediss://")):
        options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
        options.setdefault("socket_timeout", CONNECT_TIMEOUT)
    conn = broker.connection(options=options)
    conn.connect_timeout = CONNECT_TIMEOUT
    try:
        # A command line, a health check or a web page must answer promptly, not wait for an
        # outage to end: one attempt, and one more after a short pause.
        conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2,
                               interval_max=0.2)
    except Exception as exc:  # noqa: BLE001 - kombu raises the transport's own errors
        conn.release()
        raise BrokerUnreachable(f"Cannot reach the broker at {broker.safe_url()} "
                                f"({broker.masked(f'{type(exc).__name__}: {exc}')})") from exc
    try:
        yield conn
    finally:
        conn.release()


def broadcast(command: str, arguments: dict[str, Any] | None = None,
              destination: list[str] | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Send ``command`` to every worker (or those named in ``destination``); their replies by
    worker name, as collected within ``timeout`` seconds."""
    with _connected() as conn:
        replies = broker.mailbox(conn)._broadcast(
            command, arguments or {}, destination, reply=True, timeout=timeout,
            # Named workers: stop waiting once all have answered.
            limit=len(destination) if destination else None)
    merged: dict[str, Any] = {}
    for reply in replies or ():
        if isinstance(reply, dict):
            merged.update(reply)
    return merged


def ping(destination: list[str] | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The workers that answered, each with its reply (``{"ok": "pong"}``)."""
    return broadcast("ping", destination=destination, timeout=timeout)


def inspect(what: str, destination: list[str] | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Ask the workers ``what`` (one of ``INSPECT``); their replies by worker name."""
    if what not in INSPECT:
        raise ValueError(f"Cannot inspect {what!r}; choose one of {', '.join(INSPECT)}")
    return broadcast(what, destination=destination, timeout=timeout)


def revoke(task_ids: Iterable[str], terminate: bool = False,
           destination: list[str] | None = None,
           timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Revoke tasks: stored (so every worker, now or later, skips them), then told to the
    running workers at once (with ``terminate``, those running them kill them). The workers'
    replies by name; none is needed for the revocation to hold."""
    from .results import AsyncResult  # models: only once Django is set up

    ids = list(task_ids)
    for task_id in ids:
        AsyncResult(task_id).revoke(terminate=terminate)
    return broadcast("revoke", {"task_id": ids, "terminate": terminate, "signal": "SIGKILL"},
                     destination=destination, timeout=timeout)


def queue_lengths(names: Iterable[str]) -> dict[str, int | None]:
    """Messages ready in each queue (not those workers hold); None for a queue the broker
    does not have."""
    sizes: dict[str, int | None] = {}
    with _connected() as conn:
        channel = conn.channel()
        try:
            for name in names:
                try:
                    sizes[name] = broker.queue_size(channel, name)
                except conn.channel_errors as exc:
                    if getattr(exc, "reply_code", None) != 404:
                        raise
                    sizes[name] = None  # AMQP closed the channel for it: open another
                    with contextlib.suppress(Exception):
                        channel.close()
                    channel = conn.channel()
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    return sizes


def purge(names: Iterable[str]) -> dict[str, int]:
    """Delete the messages ready in each queue; how many went from each.

    Messages a worker has received and not yet acknowledged are not ready, so they stay: a
    worker that is stopped without running them gives them back."""
    counts: dict[str, int] = {}
    with _connected() as conn:
        channel = conn.channel()
        try:
            for name in names:
                counts[name] = int(channel.queue_purge(name) or 0)
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    return counts
