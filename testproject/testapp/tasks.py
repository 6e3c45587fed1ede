"""The example shop's tasks: each takes an order's primary key and loads the order itself."""

from __future__ import annotations

import logging
import os
import time
from decimal import Decimal
from typing import Any

from django.core.mail import send_mail
from django.db.models import DecimalField, ExpressionWrapper, F, Sum
from django.utils import timezone

from django_tasks_q import AsyncResult, Signature, Task, chord, group, task

from .models import Order, OrderLine

logger = logging.getLogger(__name__)


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


# Workflows: the month's sales report, composed of small tasks (docs/workflows.rst).
@task(results="all")
def report_sum_totals(totals: list[str]) -> str:
    """Add up order totals (strings, as recalculate_totals returns them): a chord's body,
    which keeps its result so that a caller can wait for the sum."""
    return str(sum((Decimal(total) for total in totals), Decimal("0.00")))


@task(results="all")
def report_mail_finance(total: str, year: int, month: int) -> dict[str, Any]:
    """Mail the month's total to finance; the last step, so it keeps its result for callers."""
    # At least once: a worker lost after the mail went out sends it again. Finance can live
    # with a duplicate; a task that must not repeat checks first, as send_receipt does.
    send_mail(
        subject=f"Sales {year}-{month:02d}",
        message=f"Orders placed in {year}-{month:02d} total {total}.",
        from_email=None,
        recipient_list=["finance@example.com"],
    )
    return {"year": year, "month": month, "total": total}


@task()
def report_alert(task_id: str) -> None:
    """Errback sent as a task of its own: it gets the failed task's id, and reads its failure."""
    send_mail(
        subject=f"Task {task_id} failed",
        message=f"{AsyncResult(task_id).result!r}\n/admin/django_tasks_q/taskresult/?q={task_id}",
        from_email=None,
        recipient_list=["ops@example.com"],
    )


@task()
def report_log_failure(request: Any, exc: BaseException, traceback: str) -> None:
    """Errback called in the worker, where the task failed, with its request and exception."""
    logger.error("Monthly report: %s[%s] failed: %r", request.task, request.id, exc)


def report_monthly(year: int, month: int) -> Signature:
    """The month's report as one workflow: each order's total at once (a chord), their sum,
    then a mail to finance; a failure anywhere is logged by report_log_failure."""
    orders = Order.objects.filter(created_at__year=year, created_at__month=month)
    header = group(recalculate_totals.s(pk) for pk in orders.values_list("pk", flat=True))
    workflow = chord(header, report_sum_totals.s()) | report_mail_finance.s(year, month)
    return workflow.on_error(report_log_failure.s())


# Workflows on real workers (tests/e2e/test_workflows.py). The tasks that must leave a trace of
# every run write a line on an order the test gives them: a journal the test reads back.
def _wf_journal(order_id: int, entry: str) -> None:
    OrderLine.objects.create(order_id=order_id, description=entry[:200], quantity=1,
                             unit_price=Decimal("0.00"))


@task()
def wf_add(x: int, y: int) -> int:
    """Add two numbers; keeps failures only (a workflow's members are kept for it anyway)."""
    return x + y


@task(results="all")
def wf_double(x: int) -> int:
    """Twice ``x``; keeps its result: the last step of a chain, or a link."""
    return 2 * x


@task()
def wf_fail_on(x: int, bad: int) -> int:
    """``x``, or a ValueError when ``x`` is ``bad``."""
    if x == bad:
        raise ValueError(f"{x} is bad")
    return x


@task(bind=True, results="all")
def wf_slow(self: Task, x: int, seconds: float, order_id: int | None = None) -> int:
    """``x`` after ``seconds``. With ``order_id``, each start is noted (with the worker), and
    only the first one sleeps: delivered again after its worker died, it returns at once."""
    if order_id is not None:
        entry = f"wf_slow {self.request.id} started"
        again = OrderLine.objects.filter(order_id=order_id,
                                         description__startswith=entry).exists()
        _wf_journal(order_id, f"{entry} on {self.request.hostname}")
        if again:
            return x
    time.sleep(seconds)
    return x


@task(results="all")
def wf_collect(values: list[int], order_id: int) -> list[int]:
    """A chord's body: notes each run and the values it got, and returns them."""
    _wf_journal(order_id, f"wf_collect {values}")
    return values


@task(results="all")
def wf_failed_id(task_id: str) -> str:
    """An errback sent as a task: gets the failed task's id, and keeps it as its result."""
    return task_id


@task()
def wf_note_error(request: Any, exc: BaseException, traceback: str, order_id: int) -> None:
    """An errback called where the task failed: notes the task's id and exception."""
    _wf_journal(order_id, f"wf_note_error {request.id} {type(exc).__name__}: {exc}")
