"""Processes: runs the worker extensions (``django_tasks_q.extensions``): their command-line
options, their start and stop steps, and their consumers on the worker's broker connection.

Each extension's consumers get a channel of their own on the connection the worker takes tasks
from, so an error that closes one (a refused declaration) never closes another's, nor the
tasks'. Their callbacks run on the worker's event loop, between task messages, guarded: one that
raises is logged with the message's id and the message is rejected, and the loop goes on.

Tasks a handler (or a step, or a timer call) sends are confirmed by the broker (RabbitMQ's
confirms, Redis's answers) when it returns, as a pool child has those of a task confirmed when
the task ends: nothing else in the worker's process would collect those confirms, or send the
messages again on a new connection.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import broker
from ..exceptions import ExtensionError
from ..extensions import WorkerExtension, extension_classes, label
from .state import Watcher

if TYPE_CHECKING:
    from .main import Worker

logger = logging.getLogger("django_tasks_q.worker")

#: Seconds before consumers that could not be started after a reconnect are tried again.
CONSUMERS_RETRY = 5.0

Options = Mapping[type[WorkerExtension], Mapping[str, Any]]


def add_arguments(parser: argparse.ArgumentParser,
                  classes: Iterable[type[WorkerExtension]] | None = None
                  ) -> dict[type[WorkerExtension], list[str]]:
    """Add each extension's options to ``parser`` (``taskworker``'s), in a group of its own;
    the ``dest`` of each option, by extension."""
    dests: dict[type[WorkerExtension], list[str]] = {}
    for cls in extension_classes() if classes is None else classes:
        # The first paragraph of its own docstring (a class does not inherit __doc__).
        about = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        group = parser.add_argument_group(f"worker extension {label(cls)}", about or None)
        try:
            cls.add_arguments(group)
        except Exception as exc:  # a clash with another option, or a mistake in the code
            raise ExtensionError(f"Worker extension {label(cls)} could not add its options to "
                                 f"taskworker: {exc}") from exc
        # The group's own list: argparse keeps no other record of which options it added.
        dests[cls] = [action.dest for action in group._group_actions]
    return dests


def default_options(cls: type[WorkerExtension]) -> dict[str, Any]:
    """The defaults of the options ``cls`` declares (a worker built without the command)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group()
    cls.add_arguments(group)
    return {action.dest: action.default for action in group._group_actions
            if action.default is not argparse.SUPPRESS}


class Extensions(Watcher):
    """The worker's extensions, built with it: started after its pool, their consumers on
    every connection, stopped in reverse order."""

    def __init__(self, worker: Worker, classes: Iterable[type[WorkerExtension]],
                 options: Options) -> None:
        self.worker = worker
        self.extensions: list[WorkerExtension] = []
        for cls in classes:
            given = options.get(cls)
            try:
                values = dict(default_options(cls) if given is None else given)
                self.extensions.append(cls(worker, **values))
            except Exception as exc:
                raise ExtensionError(f"Worker extension {label(cls)} could not be created: "
                                     f"{type(exc).__name__}: {exc}") from exc
        self._started: list[WorkerExtension] = []
        self._consumers: list[Any] = []
        self._connected_before = False
        self._retry: Any = None

    def __bool__(self) -> bool:
        return bool(self.extensions)

    # -- steps -------------------------------------------------------------------------------
    def start(self) -> None:
        """Call ``start()`` of each extension in order; ``ExtensionError`` for the first that
        raises (those started before it are stopped by ``stop()``)."""
        for ext in self.extensions:
            try:
                ext.start(self.worker)
            except Exception as exc:
                logger.exception("Worker extension %s failed to start", label(type(ext)))
                raise ExtensionError(f"Worker extension {label(type(ext))} failed to start: "
                                     f"{type(exc).__name__}: {exc}") from exc
            self._started.append(ext)
            logger.debug("Worker extension %s started", label(type(ext)))
        broker.flush_or_log()

    def stop(self) -> None:
        """Call ``stop()`` of each started extension, last started first; one that raises is
        logged and the others still stop."""
        while self._started:
            ext = self._started.pop()
            try:
                ext.stop(self.worker)
            except Exception:  # noqa: BLE001 - the others must stop all the same
                logger.exception("Worker extension %s failed to stop", label(type(ext)))
            broker.flush_or_log()

    # -- consumers (the consumer calls these as a watcher) ------------------------------------
    def attach(self, hub: Any, connection: Any) -> None:
        self._consumers, self._retry = [], None
        first = not self._connected_before
        failed = [ext for ext in self._started if not self._start_consumers(ext, connection, first)]
        self._connected_before = True
        if failed:
            self._retry = hub.call_later(CONSUMERS_RETRY, self._start_again, failed, connection)

    def _start_again(self, extensions: list[WorkerExtension], connection: Any) -> None:
        failed = [ext for ext in extensions if not self._start_consumers(ext, connection, False)]
        if failed and self.worker.consumer.hub is not None:
            self._retry = self.worker.consumer.hub.call_later(
                CONSUMERS_RETRY, self._start_again, failed, connection)

    def _start_consumers(self, ext: WorkerExtension, connection: Any, first: bool) -> bool:
        """Start ``ext``'s consumers on a new channel of ``connection``; False when that failed
        after a reconnect (tried again later). On the first connection a failure stops the
        worker: it is a mistake in the extension or its queues, not an outage."""
        if type(ext).get_consumers is WorkerExtension.get_consumers:
            return True  # none: no channel either
        name = label(type(ext))
        channel = connection.channel()
        try:
            consumers = list(ext.get_consumers(channel) or ())
            for consumer in consumers:
                _guard(name, consumer)
            for consumer in consumers:
                consumer.consume()
        except connection.connection_errors:
            raise  # the worker reconnects, and asks again
        except Exception as exc:
            with contextlib.suppress(Exception):
                channel.close()
            if first:
                logger.exception("Worker extension %s: get_consumers() failed", name)
                raise ExtensionError(f"Worker extension {name} could not start its consumers: "
                                     f"{type(exc).__name__}: {exc}") from exc
            logger.exception("Worker extension %s could not start its consumers again after "
                             "reconnecting; trying again in %gs", name, CONSUMERS_RETRY)
            return False
        self._consumers.extend(consumers)
        return True

    def stopping(self) -> None:
        # Stop taking messages with the tasks; the channels stay open, so handlers can still
        # acknowledge what they received until the connection closes.
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for consumer in self._consumers:
            with contextlib.suppress(Exception):  # the connection may be gone already
                consumer.cancel()
        self._consumers = []


def _guard(name: str, consumer: Any) -> None:
    """Make ``consumer``'s callbacks log and reject a message they fail on, instead of raising
    into the worker's event loop."""
    if consumer.on_message is not None:
        consumer.on_message = _guarded(name, consumer.on_message)
    elif consumer.callbacks:
        consumer.receive = _guarded(name, consumer.receive)
    else:
        raise ValueError(f"get_consumers() returned {consumer!r}, which has neither callbacks "
                         f"nor on_message: nothing would handle its messages")
    if consumer.on_decode_error is None:
        def undecodable(message: Any, exc: Exception) -> None:
            _failed(name, message, f"it cannot be decoded ({type(exc).__name__}: {exc})",
                    traceback=False)

        consumer.on_decode_error = undecodable


def _guarded(name: str, handle: Callable[..., None]) -> Callable[..., None]:
    """``handle`` (``on_message(message)`` or ``receive(body, message)``), logging and
    rejecting the message it raises on, then having the tasks it sent confirmed."""
    def guarded(*args: Any) -> None:
        try:
            handle(*args)
        except Exception:  # noqa: BLE001 - see the module's docstring
            _failed(name, args[-1], "its handler raised")
        finally:
            broker.flush_or_log()

    return guarded


def _failed(name: str, message: Any, why: str, traceback: bool = True) -> None:
    """Log that ``message`` could not be handled, and reject it unless it was settled."""
    info = message.delivery_info or {}
    settled = message.acknowledged
    logger.error("Worker extension %s: message %s (exchange %r, routing key %r): %s; %s", name,
                 message_id(message), info.get("exchange", ""), info.get("routing_key", ""), why,
                 "it was settled already" if settled else "rejected", exc_info=traceback)
    if not settled:
        try:
            message.reject(requeue=False)
        except Exception as exc:  # noqa: BLE001 - the broker delivers it again, later
            logger.warning("Could not reject message %s: %s: %s", message_id(message),
                           type(exc).__name__, exc)


def message_id(message: Any) -> str:
    """The id a log line gives ``message``: its ``message_id`` property, a Celery task id, its
    ``correlation_id``, or else its delivery tag."""
    properties, headers = message.properties or {}, message.headers or {}
    found = properties.get("message_id") or headers.get("id") or properties.get("correlation_id")
    return str(found) if found else f"with delivery tag {message.delivery_tag}"
