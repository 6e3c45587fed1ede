"""The example shop's tasks written with Django's own ``django.tasks`` (Django 6.0 and newer).

They run on the same ``taskworker`` as ``tasks.py`` through ``TasksQBackend`` (see ``TASKS`` in
the settings). Nothing imports this module on Django 5.2, which has no ``django.tasks``; a worker
imports it when the first message for one of these tasks arrives.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any

import django
from django.dispatch import receiver
from django.tasks import TaskContext, TaskResult, task
from django.tasks.signals import task_enqueued, task_finished, task_started

from .models import Order

logger = logging.getLogger("testproject.django_tasks")


@task
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y


@task(priority=50)
async def order_total(order_id: int) -> str:
    """The order's total, read with the async ORM (as a string: results are JSON)."""
    order = await Order.objects.aget(pk=order_id)
    total: Decimal = order.total
    return str(total)


@task(takes_context=True)
def whoami(context: TaskContext, label: str) -> dict[str, Any]:
    """What the task learns from its context."""
    result = context.task_result
    return {"label": label, "id": result.id, "attempt": context.attempt,
            "status": str(result.status), "worker_ids": result.worker_ids}


@task
def refuse(reason: str) -> None:
    """Fails every time."""
    raise ValueError(reason)


@task
async def nap(seconds: float) -> str:
    """Sleeps ``seconds`` without blocking the event loop it runs in."""
    await asyncio.sleep(seconds)
    return "rested"


@task(backend="retrying", takes_context=True)
def flaky_warehouse(context: TaskContext, order_id: int) -> dict[str, Any]:
    """The warehouse API fails twice; the "retrying" backend's OPTIONS retry ConnectionError."""
    if context.attempt < 3:
        raise ConnectionError(f"warehouse API unreachable (attempt {context.attempt})")
    return {"order_id": order_id, "attempt": context.attempt}


if django.VERSION >= (6, 1):
    # Django 6.1 passes extra @task() arguments to the backend's Task class: our options.
    @task(takes_context=True, max_retries=1, autoretry_for=(ConnectionError,),
          default_retry_delay=0, soft_time_limit=5)
    def give_up_after_one_retry(context: TaskContext) -> None:
        """Always fails: one retry, then the failure is final."""
        raise ConnectionError(f"still down (attempt {context.attempt})")


# Django's task signals, logged so that the worker's log shows each attempt.
@receiver(task_enqueued)
@receiver(task_started)
@receiver(task_finished)
def log_signal(sender: type[Any], task_result: TaskResult, signal: Any, **kwargs: Any) -> None:
    """One line per signal: its name, the sender, the result's id, status and attempts."""
    name = {task_enqueued: "enqueued", task_started: "started", task_finished: "finished"}
    logger.info("django-task %s %s %s %s attempts=%d errors=%s", name[signal], sender.__name__,
                task_result.id, task_result.status, task_result.attempts,
                [e.exception_class_path for e in task_result.errors])
