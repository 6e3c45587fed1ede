"""Django's tasks framework on our backend, in one process; and ``async def`` tasks of ours.

The worker side runs the published message with ``execute.run``, as a pool does. Tests of
``django.tasks`` are skipped on Django 5.2, which does not have it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import django
import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from django_tasks_q import execute, message, registry, task
from django_tasks_q.exceptions import SoftTimeLimitExceeded, TaskNotRegistered
from django_tasks_q.models import TaskResult as ResultRow

from .memory import drain

HAS_TASKS = django.VERSION >= (6, 0)
needs_tasks = pytest.mark.skipif(not HAS_TASKS, reason="django.tasks needs Django 6.0")
needs_61 = pytest.mark.skipif(django.VERSION < (6, 1),
                              reason="@task(**options) needs Django 6.1")

BACKEND = "django_tasks_q.backend.TasksQBackend"
TASKS = {
    "default": {"BACKEND": BACKEND, "OPTIONS": {"results": "all"}},
    "retrying": {"BACKEND": BACKEND,
                 "OPTIONS": {"results": "all", "autoretry_for": (ConnectionError,),
                             "max_retries": 3, "default_retry_delay": 0}},
}
MODULE = "testproject.testapp.django_tasks"

if HAS_TASKS:
    from django.tasks import TaskResultStatus, task_backends
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist, TaskResultMismatch
    from django.tasks.signals import task_enqueued, task_finished, task_started

    from django_tasks_q import django_task
    from django_tasks_q.backend import ResultNotKept, TasksQBackend, TasksQTask

    with override_settings(TASKS=TASKS):  # defined on our backend, as in the example project
        from testproject.testapp import django_tasks as shop

pytestmark = pytest.mark.django_db


# -- our own async def tasks (any Django) ----------------------------------------------------

@task(results="all")
async def double(x: int) -> int:
    """An async task of ours."""
    await asyncio.sleep(0)
    return x * 2


@task
async def dawdle(seconds: float) -> str:
    """Sleeps; stopped by a soft time limit."""
    await asyncio.sleep(seconds)
    return "done"


@task
async def own_timeout() -> None:
    """Raises the TimeoutError that a soft limit also uses inside the loop."""
    async with asyncio.timeout(0.01):
        await asyncio.sleep(1)


def job(name: str, *args: Any, soft: float | None = None) -> message.TaskMessage:
    return message.TaskMessage(id=message.new_id(), name=name, args=list(args), kwargs={},
                               queue="default", soft_time_limit=soft)


def test_an_async_task_called_plainly_returns_a_coroutine() -> None:
    coro = double(4)
    assert asyncio.iscoroutine(coro)
    assert asyncio.run(coro) == 8


def test_the_worker_awaits_an_async_task_and_keeps_its_value() -> None:
    m = job("tests.test_django_tasks.double", 21)
    outcome = execute.run(m, hostname="w1")
    assert (outcome.status, outcome.value) == ("SUCCESS", 42)
    assert ResultRow.objects.get(task_id=m.id).result == 42


@pytest.mark.django_db(transaction=True)  # the other thread's row is committed: flushed after
@pytest.mark.parametrize("where", ["main thread", "other thread"])
def test_a_soft_time_limit_stops_an_async_task_in_any_thread(where: str) -> None:
    outcomes: list[execute.Outcome] = []
    started = time.monotonic()
    run = lambda: outcomes.append(  # noqa: E731
        execute.run(job("tests.test_django_tasks.dawdle", 5, soft=0.2)))
    if where == "main thread":
        run()
    else:  # the threads pool: no SIGALRM there, but the event loop's timeout works
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(10)
    assert time.monotonic() - started < 3
    [outcome] = outcomes
    assert outcome.status == "FAILURE"
    assert isinstance(outcome.exc, SoftTimeLimitExceeded)
    assert "soft time limit (0.2s) exceeded" in outcome.error
    assert "in dawdle" in (outcome.traceback or "")


def test_a_timeout_of_the_task_itself_is_not_taken_for_the_soft_limit() -> None:
    outcome = execute.run(job("tests.test_django_tasks.own_timeout", soft=30))
    assert outcome.status == "FAILURE" and isinstance(outcome.exc, TimeoutError)
    assert not isinstance(outcome.exc, SoftTimeLimitExceeded)


def test_eager_mode_runs_async_tasks(settings: Any) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://", "EAGER": True}
    assert double.delay(5).get() == 10


# -- django.tasks on TasksQBackend -----------------------------------------------------------

@pytest.mark.skipif(HAS_TASKS, reason="Django 6 has django.tasks")
def test_without_django_tasks_the_backend_says_what_is_needed() -> None:
    with pytest.raises(ImportError, match=r"use Django 6.0 or newer, or django_tasks_q's own"):
        import django_tasks_q.backend  # noqa: F401



def receive(queue: str = "default") -> message.TaskMessage:
    """The one message waiting in ``queue``, as a worker decodes it."""
    [(headers, body, _)] = drain(queue)
    return message.decode(headers, body, queue=queue)


@pytest.fixture
def tasks_settings(settings: Any) -> Iterator[Any]:
    """Our backend as TASKS, on an empty memory:// broker."""
    settings.TASKS = TASKS
    for queue in ("default", "high", "low"):
        drain(queue)
    yield settings


@pytest.fixture
def heard() -> Iterator[list[tuple[str, type, str, str]]]:
    """(signal, sender, result id, status) of each of Django's task signals sent."""
    got: list[tuple[str, type, str, str]] = []

    def make(name: str) -> Any:
        def receiver(sender: type, task_result: Any, **kwargs: Any) -> None:
            got.append((name, sender, task_result.id, str(task_result.status)))
        return receiver

    receivers = {task_enqueued: make("enqueued"), task_started: make("started"),
                 task_finished: make("finished")}
    for signal, receiver in receivers.items():
        signal.connect(receiver)
    yield got
    for signal, receiver in receivers.items():
        signal.disconnect(receiver)


@needs_tasks
def test_the_backend_is_django_tasks_q_and_says_what_it_supports(tasks_settings: Any) -> None:
    backend = task_backends["default"]
    assert isinstance(backend, TasksQBackend) and backend.task_class is TasksQTask
    assert isinstance(shop.add, TasksQTask)
    assert (backend.supports_defer, backend.supports_priority,
            backend.supports_async_task, backend.supports_get_result) == (True, True, True, True)
    tasks_settings.TASKS = {"default": {"BACKEND": BACKEND}}  # TASKS_Q's RESULTS: "errors"
    assert task_backends["default"].supports_get_result is False
    tasks_settings.TASKS_Q = {"BROKER_URL": "memory://", "RESULTS": "all"}
    assert task_backends["default"].supports_get_result is True


@needs_tasks
def test_enqueue_publishes_a_marked_celery_message(tasks_settings: Any,
                                                   heard: list[Any]) -> None:
    result = shop.add.enqueue(2, 3)
    assert result.status == TaskResultStatus.READY and not result.is_finished
    assert result.enqueued_at is not None and result.worker_ids == [] and result.attempts == 0
    [(headers, body, priority)] = drain()
    assert headers["task"] == f"{MODULE}.add" and headers["id"] == result.id
    assert headers["django_task_backend"] == "default" and headers["django_task_priority"] == 0
    assert body[:2] == [[2, 3], {}] and priority == 5  # Django's default priority 0 -> 5
    assert headers["ignore_result"] is False  # kept: OPTIONS results "all"
    assert heard == [("enqueued", TasksQBackend, result.id, "READY")]


@needs_tasks
def test_priorities_map_monotonically_onto_0_to_9() -> None:
    mapped = [django_task.broker_priority(p) for p in range(-100, 101)]
    assert mapped == sorted(mapped) and (mapped[0], mapped[100], mapped[-1]) == (0, 5, 9)
    # The table in docs/django-tasks.rst: the lowest Django priority of each step.
    firsts = {django_task.broker_priority(p): p for p in range(100, -101, -1)}
    assert firsts == {0: -100, 1: -88, 2: -66, 3: -44, 4: -22, 5: 0, 6: 23, 7: 45, 8: 67, 9: 89}


@needs_tasks
def test_priority_queue_and_run_after_reach_the_message(tasks_settings: Any) -> None:
    later = timezone.now() + timedelta(hours=1)
    result = shop.add.using(priority=100, queue_name="high", run_after=later).enqueue(1, 1)
    [(headers, body, priority)] = drain("high")
    assert priority == 9 and headers["django_task_priority"] == 100
    assert message.decode(headers, body).eta == later
    assert result.task.run_after == later
    with pytest.raises(InvalidTask, match=r"Queue 'nowhere' .* not in TASKS_Q\['QUEUES'\]"):
        shop.add.using(queue_name="nowhere")


@needs_tasks
def test_statuses_from_enqueue_to_success(tasks_settings: Any, heard: list[Any]) -> None:
    running: list[str] = []

    def during(sender: type, task_result: Any, **kwargs: Any) -> None:
        running.append(str(shop.add.get_result(task_result.id).status))

    result = shop.add.enqueue(20, 22)
    assert shop.add.get_result(result.id).status == TaskResultStatus.READY  # the PENDING row
    task_started.connect(during)
    try:
        assert execute.run(receive(), hostname="w1").status == "SUCCESS"
    finally:
        task_started.disconnect(during)
    assert running == ["RUNNING"]  # STARTED was stored before task_started
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 42
    assert result.worker_ids == ["w1"] and result.attempts == 1 and result.errors == []
    assert result.enqueued_at <= result.started_at <= result.finished_at  # type: ignore[operator]
    assert result.last_attempted_at == result.started_at
    assert [(h[0], h[1], h[3]) for h in heard] == [
        ("enqueued", TasksQBackend, "READY"), ("started", TasksQBackend, "RUNNING"),
        ("finished", TasksQBackend, "SUCCESSFUL")]


@needs_tasks
def test_a_failure_keeps_its_class_path_and_traceback(tasks_settings: Any,
                                                      heard: list[Any]) -> None:
    result = shop.refuse.enqueue("out of stock")
    execute.run(receive(), hostname="w1")
    result.refresh()
    assert result.status == TaskResultStatus.FAILED and result.is_finished
    [error] = result.errors
    assert error.exception_class_path == "builtins.ValueError"
    assert error.exception_class is ValueError
    assert "ValueError: out of stock" in error.traceback and "in refuse" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value  # noqa: B018
    assert heard[-1][3] == "FAILED"


@needs_tasks
def test_an_async_task_uses_the_async_orm(tasks_settings: Any) -> None:
    from testproject.testapp.models import Order

    order = Order.objects.create(customer_email="ada@example.com", total="12.50")
    result = shop.order_total.enqueue(order.pk)
    [(headers, body, priority)] = drain()
    assert priority == 7  # its priority, 50
    execute.run(message.decode(headers, body, queue="default"), hostname="w1")
    assert result.status == TaskResultStatus.READY  # as enqueued, until refreshed
    result.refresh()
    assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, "12.50")


@needs_tasks
def test_a_task_that_takes_context(tasks_settings: Any) -> None:
    result = shop.whoami.enqueue("hello")
    execute.run(receive(), hostname="w2")
    result.refresh()
    assert result.return_value == {"label": "hello", "id": result.id, "attempt": 1,
                                   "status": "RUNNING", "worker_ids": ["w2"]}


@needs_tasks
def test_backend_options_retry_and_each_attempt_is_reported(tasks_settings: Any,
                                                            heard: list[Any]) -> None:
    adapter = registry.get(f"{MODULE}.flaky_warehouse")
    assert (adapter.max_retries, adapter.autoretry_for) == (3, (ConnectionError,))
    result = shop.flaky_warehouse.enqueue(7)
    msg = receive()
    assert execute.run(msg, hostname="w1").status == "RETRY"
    result.refresh()
    assert result.status == TaskResultStatus.READY and result.attempts == 1
    assert [e.exception_class_path for e in result.errors] == ["builtins.ConnectionError"]
    msg.retries += 1  # as the worker republishes it
    assert execute.run(msg, hostname="w2").status == "RETRY"
    msg.retries += 1
    assert execute.run(msg, hostname="w3").status == "SUCCESS"
    result.refresh()
    assert result.return_value == {"order_id": 7, "attempt": 3}
    assert result.worker_ids == ["w3", "w3", "w3"] and result.errors == []
    finished = [(h[3]) for h in heard if h[0] == "finished"]
    assert finished == ["READY", "READY", "SUCCESSFUL"]
    assert all(h[1] is TasksQBackend for h in heard)


@needs_tasks
@needs_61
def test_options_given_to_the_decorator_on_django_61(tasks_settings: Any) -> None:
    adapter = registry.get(f"{MODULE}.give_up_after_one_retry")
    assert (adapter.max_retries, adapter.default_retry_delay, adapter.soft_time_limit) == (
        1, 0, 5)
    result = shop.give_up_after_one_retry.enqueue()
    msg = receive()
    assert msg.soft_time_limit == 5  # travels in the message, as ours do
    assert execute.run(msg, hostname="w1").status == "RETRY"
    msg.retries += 1
    assert execute.run(msg, hostname="w1").status == "FAILURE"
    result.refresh()
    assert result.status == TaskResultStatus.FAILED and result.attempts == 2
    assert "attempt 2" in result.errors[0].traceback


@needs_tasks
@needs_61
def test_a_bad_option_is_refused_when_the_task_is_defined(tasks_settings: Any) -> None:
    from django.tasks import task as django_task_decorator

    with pytest.raises(InvalidTask, match=r"results='some' must be 'errors', 'all' or 'none'"):
        django_task_decorator(results="some")(_module_level)


def _module_level() -> None:
    """A function for definition checks."""


@needs_tasks
def test_results_not_kept_are_refused_clearly(tasks_settings: Any) -> None:
    tasks_settings.TASKS = {"default": {"BACKEND": BACKEND}}
    result = shop.add.enqueue(1, 2)
    assert not ResultRow.objects.filter(task_id=result.id).exists()  # no PENDING row
    with pytest.raises(ResultNotKept, match=r"keeps only failures .*'results': 'all'"):
        result.refresh()
    with pytest.raises(TaskResultDoesNotExist):  # what generic code catches
        shop.add.get_result(result.id)
    execute.run(receive(), hostname="w1")
    failed = shop.refuse.enqueue("kept")
    execute.run(receive(), hostname="w1")
    assert shop.refuse.get_result(failed.id).status == TaskResultStatus.FAILED  # failures are


@needs_tasks
def test_unknown_and_foreign_ids(tasks_settings: Any) -> None:
    with pytest.raises(TaskResultDoesNotExist) as missing:
        shop.add.get_result("no-such-id")
    assert not isinstance(missing.value, ResultNotKept)
    failed = shop.refuse.enqueue("x")
    execute.run(receive(), hostname="w1")
    with pytest.raises(TaskResultMismatch):
        shop.add.get_result(failed.id)
    ours = job("tests.test_django_tasks.double", 1)
    execute.run(ours)
    with pytest.raises(TaskResultDoesNotExist, match="read it with django_tasks_q.AsyncResult"):
        task_backends["default"].get_result(ours.id)


@needs_tasks
def test_async_api_of_django(tasks_settings: Any) -> None:
    result = async_to_sync(shop.add.aenqueue)(4, 4)
    execute.run(receive(), hostname="w1")
    assert async_to_sync(shop.add.aget_result)(result.id).return_value == 8


@needs_tasks
def test_eager_mode_runs_at_enqueue_in_order(tasks_settings: Any, heard: list[Any]) -> None:
    tasks_settings.TASKS_Q = {"BROKER_URL": "memory://", "EAGER": True}
    result = shop.nap.enqueue(0)
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == "rested"
    assert [h[0] for h in heard] == ["enqueued", "started", "finished"]
    failed = shop.refuse.enqueue("eager")
    assert failed.status == TaskResultStatus.FAILED
    assert failed.errors[0].exception_class_path == "builtins.ValueError"
    assert shop.add.get_result(shop.add.enqueue(1, 1).id).return_value == 2
    with pytest.raises(TypeError, match=r"argument 0 is a builtins.set"):
        shop.add.enqueue({1}, 2)
    assert drain() == []


@needs_tasks
@pytest.mark.django_db(transaction=True)
def test_enqueue_in_a_transaction_follows_it(tasks_settings: Any) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = shop.add.enqueue(1, 2)
        raise RuntimeError("roll back")
    assert drain() == []
    with pytest.raises(TaskResultDoesNotExist):
        shop.add.get_result(rolled_back.id)
    with transaction.atomic():
        committed = shop.add.enqueue(3, 4)
        assert drain() == []  # published on commit
        assert shop.add.get_result(committed.id).status == TaskResultStatus.READY
    assert receive().id == committed.id


@needs_tasks
def test_the_admin_resend_keeps_the_mark(tasks_settings: Any) -> None:
    adapter = registry.get(f"{MODULE}.whoami")
    adapter.check_arguments(["label"], {})  # the context is the worker's to give
    adapter.apply_async(args=["again"])
    assert drain()[0][0]["django_task_backend"] == "default"


@needs_tasks
def test_the_worker_imports_a_marked_task_it_does_not_know(
        tasks_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name, mark = f"{MODULE}.add", {registry.DJANGO_TASK_HEADER: "default"}
    fresh = {k: v for k, v in registry._tasks.items() if not k.startswith(MODULE)}
    monkeypatch.setattr(registry, "_tasks", fresh)
    monkeypatch.delitem(sys.modules, MODULE)
    monkeypatch.setattr(sys.modules["testproject.testapp"], "django_tasks", shop)
    with pytest.raises(TaskNotRegistered):
        registry.get(name)  # not marked: not imported
    found = registry.get(name, mark)
    assert isinstance(found, django_task.DjangoTaskAdapter) and MODULE in sys.modules
    with pytest.raises(TaskNotRegistered, match=r"is a ModelBase, not a django.tasks Task"):
        registry.get("testproject.testapp.models.Order", mark)
    with pytest.raises(TaskNotRegistered, match=r"not part of an installed app"):
        registry.get("os.path.join", mark)
    with pytest.raises(TaskNotRegistered, match=r"importing testproject.testapp.nope failed"):
        registry.get("testproject.testapp.nope.task", mark)
    with pytest.raises(TaskNotRegistered, match=r"has no 'missing'"):
        registry.get(f"{MODULE}.missing", mark)
    outcome = execute.run(message.TaskMessage(id=message.new_id(), name=f"{MODULE}.nope",
                                              args=[], kwargs={}, headers=mark))
    assert outcome.status == "FAILURE" and "has no 'nope'" in outcome.error


@needs_tasks
def test_checks_report_misconfiguration(tasks_settings: Any) -> None:
    assert task_backends["default"].check() == []
    tasks_settings.TASKS = {"default": {
        "BACKEND": BACKEND, "QUEUES": ["default", "high", "bulk"],
        "OPTIONS": {"retries": 3, "results": "some", "autoretry_for": ["no.such.Error"]}}}
    found = {m.id: m.msg for m in task_backends["default"].check()}
    assert set(found) == {"django_tasks_q.E102", "django_tasks_q.E103", "django_tasks_q.E104"}
    assert "'bulk'" in found["django_tasks_q.E102"]
    assert "'retries'" in found["django_tasks_q.E103"]
    tasks_settings.TASKS = {"default": {"BACKEND": BACKEND, "OPTIONS": {"rate_limit": "fast"}}}
    [bad] = task_backends["default"].check()
    assert bad.id == "django_tasks_q.E104" and "rate_limit 'fast'" in bad.msg
    tasks_settings.INSTALLED_APPS = [a for a in tasks_settings.INSTALLED_APPS
                                     if a != "django_tasks_q"]
    assert "django_tasks_q.E101" in {m.id for m in task_backends["default"].check()}


@needs_tasks
def test_bad_backend_options_are_refused_when_a_task_is_defined(tasks_settings: Any) -> None:
    tasks_settings.TASKS = {"other": {"BACKEND": BACKEND, "OPTIONS": {"max_retry": 1}}}
    from django.tasks import task as django_task_decorator

    with pytest.raises(InvalidTask, match=r"TASKS\['other'\]\['OPTIONS'\]: unknown option"):
        django_task_decorator(backend="other")(_module_level)
