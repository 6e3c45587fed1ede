"""The example shop's tasks: each takes an order's primary key and loads the order itself."""

from __future__ import annotations

import os
import time
from decimal import Decimal
from typing import Any

from django.core.mail import send_mail
from django.db.models import DecimalField, ExpressionWrapper, F, Sum
from django.utils import timezone

from django_tasks_q import Task, task

from .models import Order


class PaymentDeclined(Exception):
    """The payment provider refused the charge."""


# Customers at this domain stand for cards the payment provider always declines.
DECLINED_DOMAIN = "declined.example"


@task(max_retries=5, autoretry_for=(ConnectionError,), retry_backoff=True)
def send_receipt(order_id: int) -> str:
    """Email the customer a receipt for the order, once."""
    order = Order.objects.get(pk=order_id)
    # Delivery is at least once: a message redelivered after a worker crash must not mail twice.
    if order.receipt_sent_at is not None:
        return f"receipt for order {order_id} was already sent"
    send_mail(
        subject=f"Your receipt for order #{order.pk}",
        message=f"Thank you for your order. Total: {order.total}.",
        from_email=None,
        recipient_list=[order.customer_email],
    )
    Order.objects.filter(pk=order_id).update(receipt_sent_at=timezone.now())
    return f"receipt sent to {order.customer_email}"


@task()
def recalculate_totals(order_id: int) -> str:
    """Set the order's total to the sum of its lines; returns it as a string (not a Decimal)."""
    line_total = ExpressionWrapper(
        F("quantity") * F("unit_price"), output_field=DecimalField(max_digits=12, decimal_places=2)
    )
    total = Order.objects.get(pk=order_id).lines.aggregate(total=Sum(line_total))["total"]
    total = total or Decimal("0.00")
    Order.objects.filter(pk=order_id).update(total=total)
    return str(total)


@task()
def charge_payment(order_id: int) -> str:
    """Charge the customer; fails for declined cards, and the failure is kept as a TaskResult."""
    order = Order.objects.get(pk=order_id)
    if order.customer_email.endswith("@" + DECLINED_DOMAIN):
        raise PaymentDeclined(f"card declined for order {order_id} ({order.customer_email})")
    Order.objects.filter(pk=order_id).update(status=Order.Status.PAID)
    return f"charged {order.total} for order {order_id}"


@task(
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=False,
    max_retries=4,
    results="all",
)
def sync_to_warehouse(self: Task, order_id: int) -> dict[str, Any]:
    """Tell the warehouse about the order; its API is flaky, so the first two attempts fail."""
    # Stands in for an HTTP call that cannot connect: autoretry_for turns the ConnectionError
    # into a retry, each one after a longer delay than the last (retry_backoff).
    if self.request.retries < 2:
        raise ConnectionError(f"warehouse API unreachable (attempt {self.request.retries + 1})")
    return {"order_id": order_id, "attempts": self.request.retries + 1}


@task(results="all")
def add(x: int, y: int) -> int:
    """Add two numbers; keeps its result, which makes it handy in tests."""
    return x + y


@task(results="all")
def report_pid(seconds: float = 0) -> int:
    """Sleep ``seconds``, then return the id of the process that ran it (to watch the pool)."""
    time.sleep(seconds)
    return os.getpid()


@task(results="all")
def sales_report() -> dict[str, Any]:
    """Totals of the orders so far: sent every minute by the scheduler (BEAT_SCHEDULE)."""
    orders = Order.objects.all()
    return {"orders": orders.count(), "total": str(sum(o.total for o in orders))}
