"""Api: worker extensions: the class you subclass, how the worker finds it, and ``publish()``.

A worker extension is code of yours that runs inside ``taskworker``: start and stop steps,
kombu consumers on the worker's own broker connection, calls on the worker's timer, options of
its own on the command line. The worker side (``worker/extensions.py``) runs them; this module
is what application code imports, in web processes too, so it never imports the worker.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import conf
from .exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from argparse import _ArgumentGroup

    from kombu.entity import Exchange, Queue
    from kombu.messaging import Consumer

    from .worker.main import Worker

__all__ = ["ActiveTask", "WorkerExtension", "extension_classes", "publish",
           "register_worker_extension"]

SETTING = "TASKS_Q['WORKER_EXTENSIONS']"

_registered: list[type[WorkerExtension]] = []


class WorkerExtension:
    """Base class of worker extensions: override only the hooks you need.

    Order: the worker starts its pool, then calls ``start()`` of each extension in turn, then
    connects to the broker and starts every extension's consumers (``get_consumers()``, again
    after each reconnect), then takes tasks. At shutdown it cancels the consumers as it stops
    taking tasks, stops the pool once running tasks are done (or killed, on a cold shutdown),
    then calls ``stop()`` of each started extension, in reverse order.
    """

    @classmethod
    def add_arguments(cls, parser: _ArgumentGroup) -> None:
        """Add options to ``taskworker`` with ``parser.add_argument()`` (argparse); their
        values are passed to ``__init__`` as keyword arguments named by their ``dest``."""

    def __init__(self, worker: Worker, **options: Any) -> None:
        """Created once per worker, before the pool starts, with the options it declared."""
        self.worker = worker
        self.options = options

    def start(self, worker: Worker) -> None:
        """Called once the pool has started, before the worker connects to the broker; an
        exception stops the worker."""

    def stop(self, worker: Worker) -> None:
        """Called at shutdown, after the pool has stopped (also on a cold shutdown), if
        ``start()`` returned; an exception is logged and the other extensions still stop."""

    def get_consumers(self, channel: Any) -> Sequence[Consumer]:
        """kombu ``Consumer`` objects on ``channel`` (a channel of the worker's connection, of
        this extension's own) to start; called on every (re)connection."""
        return []


@dataclass(frozen=True)
class ActiveTask:
    """A task running in the worker's pool now (``worker.active_tasks()``)."""

    id: str
    name: str
    queue: str
    started_at: datetime  # aware, UTC
    runtime: float  # seconds since it started


def register_worker_extension(cls: type[WorkerExtension]) -> type[WorkerExtension]:
    """Have every ``taskworker`` of this project run ``cls``; call it from your
    ``AppConfig.ready()`` (or use it as a class decorator in a module ``ready()`` imports)."""
    if not (isinstance(cls, type) and issubclass(cls, WorkerExtension)):
        raise TypeError(f"register_worker_extension() takes a subclass of "
                        f"django_tasks_q.extensions.WorkerExtension, not {cls!r}")
    if cls not in _registered:
        _registered.append(cls)
    return cls


def extension_classes() -> list[type[WorkerExtension]]:
    """The extensions a worker runs, in the order they start: those named in
    ``TASKS_Q["WORKER_EXTENSIONS"]``, then those registered, each once.

    ``ImproperlyConfigured`` names the entry that is wrong and what to do about it.
    """
    found: list[type[WorkerExtension]] = []
    for cls in [*configured_classes(), *_registered]:
        if cls not in found:
            found.append(cls)
    return found


def configured_classes() -> list[type[WorkerExtension]]:
    """The classes ``TASKS_Q["WORKER_EXTENSIONS"]`` names, imported."""
    from django.utils.module_loading import import_string

    paths = conf.get().WORKER_EXTENSIONS
    if isinstance(paths, str) or not isinstance(paths, list | tuple):
        raise ImproperlyConfigured(
            f"{SETTING} is {paths!r}: it must be a list of dotted paths to WorkerExtension "
            f"subclasses, such as ['myapp.worker.OrderFeed'].")
    classes = []
    for index, path in enumerate(paths):
        where = f"{SETTING}[{index}]"
        if not isinstance(path, str):
            raise ImproperlyConfigured(
                f"{where} is {path!r}: write the dotted path of a WorkerExtension subclass as a "
                f"string, such as 'myapp.worker.OrderFeed'.")
        try:
            cls = import_string(path)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"{where} is {path!r}, which cannot be imported ({exc}). Give the dotted path "
                f"of a WorkerExtension subclass, module then class, such as "
                f"'myapp.worker.OrderFeed', or remove the entry.") from exc
        if not (isinstance(cls, type) and issubclass(cls, WorkerExtension)):
            raise ImproperlyConfigured(
                f"{where} is {path!r}, which is not a subclass of "
                f"django_tasks_q.extensions.WorkerExtension. Subclass it (its hooks are "
                f"optional), or remove the entry.")
        classes.append(cls)
    return classes


def label(cls: type) -> str:
    """``module.Class``: how logs and errors name an extension."""
    return f"{cls.__module__}.{cls.__qualname__}"


def publish(body: Any, *, exchange: str | Exchange = "", routing_key: str = "",
            declare: Sequence[Queue | Exchange] | None = None, retry: bool = True,
            retry_policy: dict[str, Any] | None = None, serializer: str = "json",
            message_id: str | None = None, **kwargs: Any) -> str:
    """Publish ``body`` (JSON unless ``serializer`` says otherwise) to ``exchange`` with
    ``routing_key``, through this process's pool of producers on the configured broker, as
    kombu's ``Producer.publish`` does (other keyword arguments are passed on to it). Returns
    the message's ``message_id`` (a new UUID unless given).

    ``declare`` lists queues (or exchanges) to declare first, once per connection: on Redis and
    ``django://`` a message sent to an exchange no queue is bound to yet is dropped. With
    ``retry`` (the default) a lost connection is retried for a few seconds, then the error is
    raised.
    """
    from . import broker, producers

    message_id = message_id or str(uuid.uuid4())
    with producers.acquire() as producer:
        producer.publish(body, exchange=exchange, routing_key=routing_key,
                         declare=list(declare or ()), retry=retry,
                         retry_policy=retry_policy or dict(broker.PUBLISH_RETRY_POLICY),
                         serializer=serializer, message_id=message_id, **kwargs)
    return message_id
