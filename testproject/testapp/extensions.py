"""The example shop's worker extensions: orders from the storefront's queue, and a watchdog for
tasks that run too long (see docs/extending.rst).

``OrderFeed`` is named in ``TASKS_Q["WORKER_EXTENSIONS"]`` (settings.py); ``LongTaskWatchdog``
is registered by the app's ``ready()`` (apps.py). Every ``taskworker`` of the project runs both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import transaction
from kombu import Consumer, Exchange, Queue

from django_tasks_q.extensions import WorkerExtension

from .models import Order, OrderLine
from .tasks import recalculate_totals

if TYPE_CHECKING:  # web processes import this module too: never the worker at run time
    from argparse import _ArgumentGroup

    from django_tasks_q.worker.main import Worker
    from django_tasks_q.worker.timer import TimerEntry

logger = logging.getLogger(__name__)

#: The storefront publishes its orders to this exchange, with the queue's name as routing key.
SHOP_EXCHANGE = Exchange("shop", type="direct", durable=True)


def order_queue(name: str = "shop.orders") -> Queue:
    """The storefront's orders queue ``name``, bound to the ``shop`` exchange by its name."""
    return Queue(name, SHOP_EXCHANGE, routing_key=name, durable=True)


class OrderFeed(WorkerExtension):
    """Orders the storefront publishes as JSON, stored as Order rows; their totals follow as a
    task."""

    @classmethod
    def add_arguments(cls, parser: _ArgumentGroup) -> None:
        parser.add_argument("--orders-queue", default="shop.orders", metavar="NAME",
                            help="The queue the storefront's orders arrive on "
                                 "(default: shop.orders).")

    def __init__(self, worker: Worker, *, orders_queue: str = "shop.orders",
                 **options: Any) -> None:
        super().__init__(worker, **options)
        self.queue = order_queue(orders_queue)
        # The task that follows each order goes where this worker (or its peers) takes tasks.
        self.task_queue = worker.options.queues[0]

    def get_consumers(self, channel: Any) -> Sequence[Consumer]:
        logger.info("OrderFeed: taking orders from queue %s", self.queue.name)
        return [Consumer(channel, queues=[self.queue], callbacks=[self.handle],
                         accept=["json"], prefetch_count=10)]

    def handle(self, body: dict[str, Any], message: Any) -> None:
        """``{"email": …, "lines": [{"description": …, "quantity": 2, "unit_price": "9.50"}]}``:
        one order. Anything else raises: the worker logs it and rejects the message."""
        with transaction.atomic():
            order = Order.objects.create(customer_email=body["email"])
            OrderLine.objects.bulk_create(
                OrderLine(order=order, description=line["description"],
                          quantity=int(line.get("quantity", 1)),
                          unit_price=Decimal(str(line["unit_price"])))
                for line in body["lines"])
            # Sent once the order is committed (ENQUEUE_ON_COMMIT): the handler stays short,
            # and the work that may be slow runs in the pool.
            recalculate_totals.apply_async((order.pk,), queue=self.task_queue)
        logger.info("OrderFeed: message %s is order #%d for %s",
                    message.properties.get("message_id"), order.pk, order.customer_email)
        message.ack()


class LongTaskWatchdog(WorkerExtension):
    """Warns, once per task, about tasks that have run for longer than a threshold."""

    @classmethod
    def add_arguments(cls, parser: _ArgumentGroup) -> None:
        parser.add_argument("--watchdog-after", type=float, default=3600.0, metavar="SECONDS",
                            help="Warn about a task once it has run this long (default: 3600).")
        parser.add_argument("--watchdog-every", type=float, default=30.0, metavar="SECONDS",
                            help="How often to look at the running tasks (default: 30).")

    def __init__(self, worker: Worker, *, watchdog_after: float = 3600.0,
                 watchdog_every: float = 30.0, **options: Any) -> None:
        super().__init__(worker, **options)
        self.after = watchdog_after
        self.every = watchdog_every
        self.reported: set[str] = set()
        self.entry: TimerEntry | None = None

    def start(self, worker: Worker) -> None:
        self.entry = worker.timer.call_repeatedly(self.every, self.check)

    def check(self) -> None:
        """Warn about each task past the threshold that was not warned about yet."""
        running = self.worker.active_tasks()
        for task in running:
            if task.runtime > self.after and task.id not in self.reported:
                self.reported.add(task.id)
                logger.warning("Task %s[%s] has been running for %.0fs (since %s), longer than "
                               "%gs", task.name, task.id, task.runtime,
                               task.started_at.isoformat(timespec="seconds"), self.after)
        self.reported &= {task.id for task in running}  # those that ended are forgotten

    def stop(self, worker: Worker) -> None:
        if self.entry is not None:
            self.entry.cancel()
