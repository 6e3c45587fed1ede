"""End-to-end tests: the producer side, a long-lived helper process run with the worker's settings.

It reads one JSON command per line on stdin and answers one JSON line on stdout, so a test can
publish tasks, inspect queues and read ``TaskResult`` rows through the library and the ORM,
on the same database and broker as the workers, without paying Django's start-up per call.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import traceback
from datetime import date, datetime
from decimal import Decimal
from typing import Any


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot answer with a {type(value).__name__}")


class Producer:
    """The commands a test can send."""

    def __init__(self) -> None:
        from django_tasks_q import broker

        self.connection = broker.connection()
        self.channel = self.connection.default_channel
        self.handles: dict[str, Any] = {}  # result handles of workflows applied, by id

    def _reopen(self) -> None:
        from django_tasks_q import broker

        with contextlib.suppress(Exception):  # the old connection is broken anyway
            self.connection.release()
        self.connection = broker.connection()
        self.channel = self.connection.default_channel

    def op_send(self, name: str, args: list[Any] | None = None,
                kwargs: dict[str, Any] | None = None, queue: str = "default",
                task_id: str | None = None, retries: int = 0) -> str:
        """Publish a task message through the library's client."""
        from django_tasks_q import client, message

        msg = message.TaskMessage(id=task_id or message.new_id(), name=name,
                                  args=list(args or []), kwargs=dict(kwargs or {}),
                                  retries=retries, queue=queue)
        client.publish(msg)
        return msg.id

    def op_send_many(self, name: str, count: int, countdown: float, queue: str) -> int:
        """Send ``count`` messages of ``name`` (args ``[i, i]``) due in ``countdown`` seconds.

        In bulk, for tests that need many messages in the queue. On AMQP without a confirm per
        message, but with a round trip on the same channel after each thousand and at the end,
        which returns only once RabbitMQ has routed every message before it. On django:// the
        rows are inserted a thousand per statement, each batch committed on its own so workers
        consume meanwhile. The queue must exist (a worker declared it).
        """
        from datetime import timedelta

        from django.utils import timezone
        from kombu import Producer as KombuProducer
        from kombu.utils.json import dumps

        from django_tasks_q import broker, conf, message
        from django_tasks_q.models import QueueMessage

        eta = timezone.now() + timedelta(seconds=countdown)
        options = {**conf.get().BROKER_OPTIONS, "confirm_publish": False}
        with broker.connection(options=options) as conn:
            channel = conn.default_channel
            embedded = conn.transport_cls == "django"
            amqp = conn.transport.driver_type == "amqp"
            rows: list[QueueMessage] = []
            if embedded:
                # Published as usual, but stored here rather than one INSERT at a time.
                def put(queue: str, payload: dict[str, Any], **kwargs: Any) -> None:
                    rows.append(QueueMessage(queue=queue, payload=dumps(payload),
                                             visible_at=timezone.now(),
                                             priority=channel._get_message_priority(payload)))

                channel._put = put
            producer = KombuProducer(channel, auto_declare=False)
            for i in range(count):
                msg = message.TaskMessage(id=message.new_id(), name=name, args=[i, i],
                                          kwargs={}, queue=queue, eta=eta)
                body, headers, properties = message.encode(msg)
                producer.publish(body, exchange="", routing_key=queue, headers=headers,
                                 content_type="application/json", content_encoding="utf-8",
                                 delivery_mode=2, **properties)
                if amqp and i % 1000 == 999:
                    # One round trip per thousand: the burst never outruns RabbitMQ's flow
                    # control far enough for a socket write to time out.
                    channel.queue_declare(queue=queue, passive=True)
            if embedded:
                for first in range(0, len(rows), 1000):
                    QueueMessage.objects.bulk_create(rows[first:first + 1000])
            elif amqp:
                # Frames of a channel are handled in order: this answer comes after them all.
                channel.queue_declare(queue=queue, passive=True)
        return count

    def op_send_due(self, name: str, args: list[Any], seconds: float, queue: str) -> str:
        """Send one task due in ``seconds``."""
        from django_tasks_q import send_task

        return send_task(name, args, queue=queue, countdown=seconds).id

    def op_parked_count(self) -> int:
        """How many messages are parked in the database."""
        from django_tasks_q.models import ParkedMessage

        return ParkedMessage.objects.count()

    def op_make_due(self) -> None:
        """Make every parked message due now (instead of waiting for it)."""
        from datetime import timedelta

        from django.utils import timezone

        from django_tasks_q.models import ParkedMessage

        ParkedMessage.objects.update(due_at=timezone.now() - timedelta(seconds=1))

    def op_send_task(self, name: str, args: list[Any], kwargs: dict[str, Any], queue: str,
                     priority: int | None = None) -> str:
        """Send a task by name through the public ``django_tasks_q.send_task``."""
        from django_tasks_q import send_task

        return send_task(name, args, kwargs, queue=queue, priority=priority).id

    def op_apply_async(self, name: str, args: list[Any], queue: str,
                       link: Any = None, link_error: Any = None) -> str:
        """Send a registered task the way application code does: ``Task.apply_async`` (with
        ``link``/``link_error``: signatures in their dict form)."""
        from django_tasks_q import registry

        return registry.get(name).apply_async(args=args, queue=queue, link=link,
                                              link_error=link_error).id

    def op_apply_workflow(self, sig: dict[str, Any]) -> dict[str, Any]:
        """``signature(sig).apply_async()`` for a chain, group or chord in its dict form; its
        result handle described (``id``, group ``members``, ``parent``), kept for op_handle."""
        from django_tasks_q import GroupResult, signature

        def describe(handle: Any) -> dict[str, Any] | None:
            if handle is None:
                return None
            members = ([r.id for r in handle.results] if isinstance(handle, GroupResult)
                       else None)
            return {"id": handle.id, "members": members, "parent": describe(handle.parent)}

        handle = signature(sig).apply_async()
        self.handles[handle.id] = handle
        return describe(handle) or {}

    def op_handle(self, handle_id: str, method: str,
                  kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call ``method`` of a handle op_apply_workflow returned: ``{"value": …}``, or
        ``{"raised": exception type, "message": …}``."""
        try:
            return {"value": getattr(self.handles[handle_id], method)(**(kwargs or {}))}
        except Exception as exc:  # noqa: BLE001 - what the test asserts on
            return {"raised": type(exc).__name__, "message": str(exc)}

    def op_order_lines(self, pk: int) -> list[str]:
        """The descriptions of order ``pk``'s lines, oldest first."""
        from testproject.testapp.models import OrderLine

        return list(OrderLine.objects.filter(order_id=pk).order_by("id")
                    .values_list("description", flat=True))

    def op_raw(self, queue: str, body_b64: str, content_type: str, content_encoding: str,
               headers: dict[str, Any], correlation_id: str) -> None:
        """Publish arbitrary bytes, bypassing the library's encoder (poison messages)."""
        from kombu import Producer as KombuProducer

        from django_tasks_q import broker

        producer = KombuProducer(self.channel, auto_declare=False)
        producer.publish(base64.b64decode(body_b64), exchange=queue, routing_key=queue,
                         content_type=content_type, content_encoding=content_encoding,
                         headers=headers, correlation_id=correlation_id, delivery_mode=2,
                         declare=[broker.queue(queue)])

    def op_publish_order(self, queue: str, body: Any, message_id: str | None = None) -> str:
        """Publish an order for the example ``OrderFeed`` through ``extensions.publish``
        (exchange ``shop``, routing key ``queue``); its message id."""
        from django_tasks_q.extensions import publish
        from testproject.testapp.extensions import SHOP_EXCHANGE, order_queue

        return publish(body, exchange=SHOP_EXCHANGE, routing_key=queue,
                       declare=[order_queue(queue)], message_id=message_id)

    def op_publish_plain(self, exchange: str, routing_key: str, body: Any,
                         message_id: str) -> None:
        """Publish JSON with a plain kombu producer, as another system would, declaring
        nothing."""
        from kombu import Producer as KombuProducer

        KombuProducer(self.channel, auto_declare=False).publish(
            body, exchange=exchange, routing_key=routing_key, serializer="json",
            message_id=message_id, delivery_mode=2)

    def op_order_queue(self, queue: str, delete: bool = False) -> int:
        """Messages ready in the example ``OrderFeed``'s queue ``queue`` (on django://, in
        flight ones too); with ``delete``, the queue is deleted after it is counted."""
        from testproject.testapp.extensions import order_queue

        if self.connection.transport_cls == "django":
            from django_tasks_q.models import QueueMessage

            count = QueueMessage.objects.filter(queue=queue).count()
        else:
            # Declared as the worker declares it: passive fails for an empty queue on Redis.
            count = int(order_queue(queue)(self.channel).queue_declare().message_count)
        if delete:
            bound = order_queue(queue)(self.channel)
            bound.purge()
            bound.delete()
        return count

    def op_orders(self, email: str) -> list[dict[str, Any]]:
        """The ``Order`` rows of customer ``email``, with their lines' descriptions."""
        from testproject.testapp.models import Order

        return [{**row, "lines": list(Order.objects.get(pk=row["id"]).lines.order_by("id")
                                      .values_list("description", flat=True))}
                for row in Order.objects.filter(customer_email=email).order_by("id").values()]

    def op_revoke(self, task_id: str, terminate: bool = False) -> None:
        """``AsyncResult(task_id).revoke(terminate=...)``, as application code calls it."""
        from django_tasks_q import AsyncResult

        AsyncResult(task_id).revoke(terminate=terminate)

    def op_create_schedule(self, name: str, task: str, args: list[Any], queue: str,
                           interval: float | None = None, crontab: str = "") -> int:
        """A new ``PeriodicTask`` (an interval in seconds, or a crontab); returns its pk."""
        from datetime import timedelta

        from django_tasks_q.models import PeriodicTask

        row = PeriodicTask.objects.create(
            name=name, task=task, args=args, queue=queue, crontab=crontab,
            interval=timedelta(seconds=interval) if interval is not None else None)
        return row.pk

    def op_change_schedule(self, name: str, interval: float | None = None,
                           enabled: bool | None = None) -> str:
        """Change a ``PeriodicTask`` as the admin does (through ``save()``); the time saved."""
        from datetime import timedelta

        from django.utils import timezone

        from django_tasks_q.models import PeriodicTask

        row = PeriodicTask.objects.get(name=name)
        if interval is not None:
            row.interval = timedelta(seconds=interval)
        if enabled is not None:
            row.enabled = enabled
        row.save()
        return timezone.now().isoformat()

    def op_periodic_runs(self, name: str) -> list[dict[str, Any]]:
        """The runs of periodic task ``name`` sent so far, oldest slot first."""
        from django_tasks_q.models import PeriodicRun

        return list(PeriodicRun.objects.filter(periodic_task__name=name).order_by("slot")
                    .values("slot", "task_id", "sent_at"))

    def op_drain_ids(self, queue: str) -> list[str]:
        """Take every message off ``queue`` (no worker runs them); their task ids."""
        from django_tasks_q import broker

        bound = broker.queue(queue, declared=True)(self.channel)
        ids = []
        while (msg := bound.get(no_ack=True)) is not None:
            ids.append(msg.headers["id"])
        return ids

    def op_count(self, queue: str) -> int:
        """Messages of ``queue`` held by the broker (for django://, in flight ones too)."""
        from django_tasks_q import broker

        if self.connection.transport_cls == "django":
            from django_tasks_q.models import QueueMessage

            return QueueMessage.objects.filter(queue=queue).count()
        _, count, _ = broker.configured_queue(queue).bind(self.channel).queue_declare()
        return int(count)

    def op_delete_queue(self, queue: str) -> None:
        """Remove ``queue``, whatever it still holds, and its exchange."""
        from django_tasks_q import broker

        bound = broker.queue(queue).bind(self.channel)
        bound.declare()  # deleting what was never declared is an error on RabbitMQ
        bound.purge()
        bound.delete()
        bound.exchange.delete()

    def op_results(self, task_ids: list[str] | None = None,
                   task_name: str | None = None) -> list[dict[str, Any]]:
        """``TaskResult`` rows, all columns."""
        from django_tasks_q.models import TaskResult

        rows = TaskResult.objects.all()
        if task_ids is not None:
            rows = rows.filter(task_id__in=task_ids)
        if task_name is not None:
            rows = rows.filter(task_name=task_name)
        return list(rows.order_by("id").values())

    def op_create_superuser(self, username: str, password: str) -> None:
        """An admin user."""
        from django.contrib.auth.models import User

        User.objects.create_superuser(username, f"{username}@example.com", password)

    def op_periodic_task(self, name: str) -> dict[str, Any]:
        """One ``PeriodicTask`` row, its fields as plain values."""
        from django_tasks_q.models import PeriodicTask

        row = PeriodicTask.objects.filter(name=name).values().get()
        row["interval"] = row["interval"].total_seconds() if row["interval"] else None
        return row

    def op_create_order(self, email: str) -> int:
        """A new ``Order`` for the shop's tasks; returns its primary key."""
        from testproject.testapp.models import Order

        return int(Order.objects.create(customer_email=email).pk)

    def op_order(self, pk: int) -> dict[str, Any]:
        """One ``Order`` row."""
        from testproject.testapp.models import Order

        return dict(Order.objects.filter(pk=pk).values().get())

    def op_reconnect(self) -> None:
        """Drop every broker and database connection (after a broker restart)."""
        from django.db import connections

        from django_tasks_q import broker

        broker.publisher().close()
        self._reopen()
        connections.close_all()


def main() -> int:
    """Serve commands until stdin closes."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()
    from django.core.signals import request_finished

    producer = Producer()
    out = sys.stdout
    out.write(json.dumps({"ok": True, "result": "ready"}) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        op = getattr(producer, "op_" + command.pop("op"))
        try:
            answer = {"ok": True, "result": op(**command)}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which raises it
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()}
        finally:
            # Each command ends as a request does: database connections closed as configured,
            # what it sent to RabbitMQ confirmed.
            request_finished.send(sender=Producer)
        out.write(json.dumps(answer, default=_plain) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
