"""Tasks used by the unit tests (imported by the tests, not autodiscovered)."""

from __future__ import annotations

from typing import Any

import django

from django_tasks_q import Task, task

calls: list[Any] = []


class Flaky(Exception):
    pass


@task(results="all")
def multiply(x: int, y: int) -> int:
    return x * y


@task
def boom(message: str) -> None:
    raise ValueError(message)


@task(autoretry_for=(Flaky,), max_retries=2, retry_backoff=True, retry_jitter=False)
def always_flaky() -> None:
    calls.append("always_flaky")
    raise Flaky("still flaky")


@task(bind=True, max_retries=3, results="all")
def retries_then_ok(self: Task[..., Any], succeed_on: int) -> int:
    if self.request.retries < succeed_on:
        raise self.retry(countdown=0)
    return self.request.retries


@task(queue="high", results="none")
def quiet() -> str:
    return "quiet"


class Reporting(Task[..., Any]):
    max_retries = 0
    reported: list[tuple[str, str]] = []

    def on_failure(self, exc: BaseException, task_id: str, args: list[Any],
                   kwargs: dict[str, Any], einfo: str) -> None:
        self.reported.append((task_id, repr(exc)))


@task(base=Reporting)
def reported_failure() -> None:
    raise RuntimeError("reported")


@task(acks_late=False)
def early_ack() -> str:
    return "acked before it ran"


@task(results="all")
def echo(kind: str) -> object:
    from decimal import Decimal

    return {1, 2} if kind == "set" else Decimal(kind)


@task(rate_limit="2/s")
def limited() -> None:
    return None


@task(bind=True)
def whoami(self: Task[..., Any]) -> dict[str, Any]:
    """What the task sees of its own invocation."""
    req = self.request
    return {"id": req.id, "queue": req.queue, "priority": req.priority,
            "hostname": req.hostname, "called_directly": req.called_directly}


#: Events that ``hold`` tasks wait on (thread pools share them with the test).
gates: dict[str, Any] = {}


@task
def hold(key: str) -> str:
    """Run until the test opens gate ``key`` (at most 20 s)."""
    import threading

    gate = gates.setdefault(key, threading.Event())
    gate.wait(20)
    return key


@task(results="all")
def fan_out(n: int) -> int:
    """Send ``multiply(i, i)`` for each i below ``n``."""
    for i in range(n):
        multiply.delay(i, i)
    return n


@task(results="all")
def fan_out_in_atomic(x: int) -> int:
    """Send ``multiply(x, x)`` from inside a transaction of the task's own."""
    from django.db import transaction

    with transaction.atomic():
        multiply.delay(x, x)
    return x


@task
def sends_itself() -> None:
    """Never settles: each run sends the next."""
    sends_itself.delay()


if django.VERSION >= (6, 0):
    from django.tasks import task as django_task

    @django_task
    def django_add(x: int, y: int) -> int:
        """A task of Django's own framework (``django.tasks``)."""
        return x + y


# Workflows (tests/test_canvas.py, tests/e2e/test_workflows.py).
@task
def add(x: int, y: int) -> int:
    return x + y


@task(results="all")
def total(values: list[int]) -> int:
    return sum(values)


@task
def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"{x} is bad")
    return x


errors_seen: list[Any] = []


@task
def note_failure(task_id: str) -> None:
    errors_seen.append(task_id)


@task
def note_failure_inline(request: Any, exc: BaseException, traceback: str) -> None:
    errors_seen.append((request.id, repr(exc)))
