"""``manage.py demo``: set up the example shop, enqueue its tasks and run a worker on them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection, connections

from django_tasks_q import AsyncResult, conf

from ...models import Order, OrderLine
from ...tasks import (
    DECLINED_DOMAIN,
    add,
    charge_payment,
    recalculate_totals,
    send_receipt,
    sync_to_warehouse,
)

CUSTOMERS = {
    "ada@example.com": [("Notebook", 2, "4.50"), ("Fountain pen", 1, "32.00")],
    "grace@example.com": [("Desk lamp", 1, "45.00")],
    f"mallory@{DECLINED_DOMAIN}": [("Espresso machine", 1, "899.00")],
}


class Command(BaseCommand):
    help = (
        "Migrate the database, create example orders, enqueue the example tasks (one fails on "
        "purpose) and run a taskworker on them in the foreground."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--no-worker",
            action="store_true",
            help="Only enqueue the tasks; start a worker later with `manage.py taskworker`.",
        )

    def handle(self, *args: Any, no_worker: bool = False, **options: Any) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write(f"Database ready: {connection.settings_dict['NAME']}")
        self.stdout.write(f"Broker: {conf.get().BROKER_URL}\n")

        orders = self.create_orders()
        enqueued = self.enqueue(orders)

        self.stdout.write(self.style.MIGRATE_HEADING(f"Enqueued {len(enqueued)} tasks:"))
        for result, note in enqueued:
            self.stdout.write(f"  {result.id}  {note}")
        self.stdout.write(
            "\nWhere the outcomes go: the TaskResult table (django_tasks_q.models.TaskResult).\n"
            "By default only failures are kept, so the declined payment shows up there with its\n"
            "traceback; add() and sync_to_warehouse() keep every result (results=\"all\").\n"
            "Look at them in the admin:\n"
            "  python manage.py createsuperuser\n"
            "  python manage.py runserver\n"
            "  http://127.0.0.1:8000/admin/django_tasks_q/taskresult/   (retry it from there)\n"
            "  http://127.0.0.1:8000/admin/django_tasks_q/dashboard/    (workers, queues, chart)\n"
            "or from `python manage.py shell`:\n"
            "  from django_tasks_q import AsyncResult\n"
            f"  AsyncResult({enqueued[-1][0].id!r}).get()   # 5\n"
        )
        if no_worker:
            self.stdout.write("Not starting a worker (--no-worker): run `manage.py taskworker`.")
            return

        self.stdout.write(
            self.style.MIGRATE_HEADING("Starting taskworker with its scheduler (-B: sales_report "
                                       "every minute); Ctrl+C stops it after running tasks.")
        )
        # Worker processes are forked from this one: hand them no open database connection.
        connections.close_all()
        call_command("taskworker", "--loglevel", "INFO", "--beat")

    def create_orders(self) -> list[Order]:
        orders = []
        for email, lines in CUSTOMERS.items():
            order = Order.objects.create(customer_email=email)
            OrderLine.objects.bulk_create(
                OrderLine(order=order, description=d, quantity=q, unit_price=Decimal(p))
                for d, q, p in lines
            )
            orders.append(order)
        self.stdout.write(
            "Created orders " + ", ".join(f"#{o.pk} ({o.customer_email})" for o in orders) + "\n"
        )
        return orders

    def enqueue(self, orders: list[Order]) -> list[tuple[AsyncResult, str]]:
        enqueued: list[tuple[AsyncResult, str]] = []
        for order in orders:
            enqueued.append((recalculate_totals.delay(order.pk), f"recalculate_totals({order.pk})"))
        for order in orders:
            declined = order.customer_email.endswith("@" + DECLINED_DOMAIN)
            note = "fails on purpose: PaymentDeclined" if declined else "succeeds"
            enqueued.append((charge_payment.delay(order.pk), f"charge_payment({order.pk}), {note}"))
        first, second = orders[0], orders[1]
        enqueued.append((send_receipt.delay(first.pk), f"send_receipt({first.pk})"))
        enqueued.append(
            (
                send_receipt.apply_async(args=(second.pk,), countdown=10),
                f"send_receipt({second.pk}), not before 10 seconds from now",
            )
        )
        enqueued.append(
            (
                sync_to_warehouse.delay(first.pk),
                f"sync_to_warehouse({first.pk}), fails twice, retried with backoff, then succeeds",
            )
        )
        enqueued.append((add.delay(2, 3), "add(2, 3), keeps its result"))
        return enqueued
