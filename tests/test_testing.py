"""Test helpers for users: capturing sent tasks, running them, eager mode, on-commit in tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from unittest import mock

import django
import pytest
from django.db import transaction
from django.dispatch import receiver
from django.test import TestCase
from django.utils import timezone

from django_tasks_q import broker, client, signals
from django_tasks_q.exceptions import TaskNotRegistered
from django_tasks_q.models import TaskResult
from django_tasks_q.testing import (
    Captured,
    CapturedTasks,
    TasksDidNotSettle,
    capture_tasks,
)

from . import tasks
from .memory import drain

# The documented way to enable the fixtures (users put it in their root conftest.py).
pytest_plugins = ["django_tasks_q.testing.pytest"]

OnCommit = Callable[..., Any]


def _refuse_broker() -> broker.Publisher:
    raise AssertionError("a task reached the broker while tasks were being captured")


@pytest.fixture
def no_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any publish that reaches the broker fails the test; the memory:// queues stay empty."""
    for queue in ("default", "high", "low"):
        drain(queue)
    monkeypatch.setattr(broker, "publisher", _refuse_broker)
    yield
    monkeypatch.undo()
    assert [drain(q) for q in ("default", "high", "low")] == [[], [], []]


@pytest.fixture
def empty_queues() -> None:
    for queue in ("default", "high", "low"):
        drain(queue)


# -- what is captured ---------------------------------------------------------------------------

def test_captures_the_message_with_its_options(no_broker: None,
                                               captured_tasks: CapturedTasks) -> None:
    before = timezone.now()
    r = tasks.multiply.apply_async(args=(1,), kwargs={"y": 2}, countdown=30, expires=600,
                                   queue="low", priority=9, task_id="fixed-id",
                                   headers={"tenant": "acme"})
    [sent] = captured_tasks
    assert r.id == sent.task_id == "fixed-id"
    assert sent.task is tasks.multiply and sent.name == "tests.tasks.multiply"
    assert (sent.args, sent.kwargs) == ([1], {"y": 2})
    assert (sent.queue, sent.priority, sent.countdown) == ("low", 9, 30.0)
    assert sent.eta is not None and sent.expires is not None
    assert before + timedelta(seconds=30) <= sent.eta <= timezone.now() + timedelta(seconds=30)
    assert sent.headers == {"tenant": "acme"} and sent.parent_id is None


def test_delay_is_routed_and_has_no_countdown(no_broker: None,
                                              captured_tasks: CapturedTasks) -> None:
    tasks.quiet.delay()
    tasks.multiply.delay(2, 3)
    assert [(c.name, c.queue, c.countdown, c.eta) for c in captured_tasks] == [
        ("tests.tasks.quiet", "high", None, None), ("tests.tasks.multiply", "default", None, None)]
    assert captured_tasks.filter(tasks.multiply) == captured_tasks[1:]
    assert captured_tasks.filter("tests.tasks.quiet") == captured_tasks.filter(queue="high")
    assert captured_tasks.filter(tasks.boom) == []


def test_send_task_by_name_is_captured_without_a_task(no_broker: None,
                                                      captured_tasks: CapturedTasks) -> None:
    r = client.send_task("elsewhere.tasks.thing", [1], {"a": "b"}, queue="low", countdown=5)
    [sent] = captured_tasks
    assert sent.task is None and sent.name == "elsewhere.tasks.thing"
    assert (sent.task_id, sent.args, sent.kwargs, sent.countdown) == (r.id, [1], {"a": "b"}, 5.0)


def test_arguments_are_captured_as_the_worker_would_decode_them(
        no_broker: None, captured_tasks: CapturedTasks) -> None:
    tasks.multiply.delay((1, 2), 3)  # type: ignore[arg-type]  # travels as a JSON list
    assert captured_tasks[0].args == [[1, 2], 3]


def test_bad_arguments_are_still_refused(no_broker: None, captured_tasks: CapturedTasks) -> None:
    with pytest.raises(TypeError, match="builtins.bytes"):
        tasks.multiply.delay(1, b"raw")  # type: ignore[arg-type]
    assert captured_tasks == []


def test_publish_signals_are_sent_and_their_headers_captured(
        no_broker: None, captured_tasks: CapturedTasks) -> None:
    seen: list[str] = []

    @receiver(signals.before_task_publish)
    def add_trace(sender: str, headers: dict[str, Any], **kwargs: Any) -> None:
        headers["x-trace"] = "t-1"

    @receiver(signals.after_task_publish)
    def note(sender: str, **kwargs: Any) -> None:
        seen.append(sender)

    try:
        tasks.multiply.delay(1, 2)
    finally:
        signals.before_task_publish.disconnect(add_trace)
        signals.after_task_publish.disconnect(note)
    assert captured_tasks[0].headers == {"x-trace": "t-1"}
    assert seen == ["tests.tasks.multiply"]


def test_capture_ends_with_the_block(empty_queues: None) -> None:
    with capture_tasks() as captured:
        tasks.multiply.delay(1, 2)
    assert client.capture is None
    r = tasks.multiply.delay(3, 4)
    assert len(captured) == 1
    assert [h["id"] for h, _, _ in drain()] == [r.id]


def test_nested_captures_each_see_their_own(no_broker: None) -> None:
    with capture_tasks() as outer:
        tasks.multiply.delay(1, 1)
        with capture_tasks() as inner:
            tasks.multiply.delay(2, 2)
        tasks.multiply.delay(3, 3)
    assert [c.args for c in outer] == [[1, 1], [3, 3]]
    assert [c.args for c in inner] == [[2, 2]]


def test_capture_wins_over_eager(no_broker: None, settings: Any) -> None:
    from django_tasks_q.results import EagerResult

    settings.TASKS_Q = {"BROKER_URL": "memory://", "EAGER": True}
    tasks.calls.clear()
    with capture_tasks() as captured:
        r = tasks.always_flaky.delay()
    assert [c.task_id for c in captured] == [r.id]
    assert tasks.calls == [] and not isinstance(r, EagerResult)  # captured, not run


def test_clear_forgets_what_was_captured(no_broker: None, captured_tasks: CapturedTasks) -> None:
    tasks.multiply.delay(1, 2)
    captured_tasks.clear()
    assert captured_tasks == [] and captured_tasks.pending == []
    tasks.multiply.delay(3, 4)
    assert [c.args for c in captured_tasks] == [[3, 4]]


def test_captured_records_are_frozen(no_broker: None, captured_tasks: CapturedTasks) -> None:
    tasks.multiply.delay(1, 2)
    with pytest.raises(AttributeError):
        captured_tasks[0].name = "other"  # type: ignore[misc]


# -- running what was captured ------------------------------------------------------------------

@pytest.mark.django_db
def test_run_runs_everything_in_order_and_returns_results(no_broker: None,
                                                         captured_tasks: CapturedTasks) -> None:
    tasks.multiply.delay(2, 3)
    tasks.multiply.apply_async(args=(4, 5), countdown=3600)  # an eta does not hold it back
    results = captured_tasks.run()
    assert [(r.status, r.get()) for r in results] == [("SUCCESS", 6), ("SUCCESS", 20)]
    assert [r.id for r in results] == [c.task_id for c in captured_tasks]
    assert captured_tasks.pending == [] and captured_tasks.run() == []
    # Through the worker's path: results="all" keeps the successes.
    assert set(TaskResult.objects.values_list("result", flat=True)) == {6, 20}


@pytest.mark.django_db
def test_run_revokes_an_expired_message(no_broker: None, captured_tasks: CapturedTasks) -> None:
    tasks.multiply.apply_async(args=(1, 2), expires=timezone.now() - timedelta(seconds=1))
    [result] = captured_tasks.run()
    assert result.status == "REVOKED"
    assert TaskResult.objects.get(task_id=result.id).status == "REVOKED"


@pytest.mark.django_db
def test_run_stores_failures_and_propagates_on_request(no_broker: None,
                                                      captured_tasks: CapturedTasks) -> None:
    tasks.boom.delay("bad input")
    [result] = captured_tasks.run()
    assert result.status == "FAILURE" and isinstance(result.result, ValueError)
    with pytest.raises(ValueError, match="bad input"):
        result.get()
    row = TaskResult.objects.get(task_id=result.id)
    assert row.status == "FAILURE" and "ValueError: bad input" in row.traceback
    tasks.boom.delay("again")
    with pytest.raises(ValueError, match="again"):
        captured_tasks.run(propagate=True)


@pytest.mark.django_db
def test_run_retries_and_calls_handlers_as_a_worker(no_broker: None,
                                                    captured_tasks: CapturedTasks) -> None:
    tasks.retries_then_ok.delay(2)
    tasks.reported_failure.delay()
    tasks.Reporting.reported.clear()
    ok, failed = captured_tasks.run()
    assert (ok.status, ok.get()) == ("SUCCESS", 2)
    assert failed.status == "FAILURE"
    assert tasks.Reporting.reported == [(failed.id, "RuntimeError('reported')")]


@pytest.mark.django_db
def test_run_also_runs_what_the_tasks_send(no_broker: None,
                                          captured_tasks: CapturedTasks) -> None:
    r = tasks.fan_out.delay(3)
    results = captured_tasks.run()
    assert [c.name for c in captured_tasks] == ["tests.tasks.fan_out"] + 3 * [
        "tests.tasks.multiply"]
    assert [x.get() for x in results] == [3, 0, 1, 4]
    assert {c.parent_id for c in captured_tasks[1:]} == {r.id}


@pytest.mark.django_db
def test_run_of_one_task_leaves_the_others_pending(no_broker: None,
                                                   captured_tasks: CapturedTasks) -> None:
    tasks.fan_out.delay(2)
    tasks.quiet.delay()
    [fanned] = captured_tasks.run(tasks.fan_out)
    assert fanned.get() == 2
    assert [c.name for c in captured_tasks.pending] == ["tests.tasks.quiet"] + 2 * [
        "tests.tasks.multiply"]
    assert [r.get() for r in captured_tasks.run("tests.tasks.multiply")] == [0, 1]
    assert [c.name for c in captured_tasks.pending] == ["tests.tasks.quiet"]


@pytest.mark.django_db
def test_run_that_never_settles_says_so(no_broker: None, captured_tasks: CapturedTasks) -> None:
    tasks.sends_itself.delay()
    settled = r"5 ran and 1 more are waiting \(next: tests.tasks.sends_itself\)"
    with pytest.raises(TasksDidNotSettle, match=settled):
        captured_tasks.run(limit=5)
    assert len(captured_tasks) == 6


@pytest.mark.django_db
def test_run_one(no_broker: None, captured_tasks: CapturedTasks) -> None:
    tasks.fan_out.delay(1)
    tasks.multiply.delay(5, 5)
    assert captured_tasks.run_one(tasks.multiply).get() == 25
    assert captured_tasks.run_one().get() == 1  # the first pending: fan_out
    assert [c.args for c in captured_tasks.pending] == [[0, 0]]  # sent, not run
    again = captured_tasks.run_one(captured_tasks[1])  # a record runs again when asked
    assert again.get() == 25
    with pytest.raises(LookupError, match=r"No pending captured task of tests.tasks.boom"):
        captured_tasks.run_one(tasks.boom)
    stranger = CapturedTasks()
    with capture_tasks() as other:
        tasks.quiet.delay()
    with pytest.raises(ValueError, match="was not captured here"):
        stranger.run_one(other[0])


@pytest.mark.django_db
def test_tasks_unknown_here_stay_pending(no_broker: None,
                                         captured_tasks: CapturedTasks) -> None:
    client.send_task("elsewhere.tasks.thing", [1])
    assert captured_tasks.run() == []
    with pytest.raises(LookupError, match="No pending captured task of elsewhere.tasks.thing"):
        captured_tasks.run_one("elsewhere.tasks.thing")
    [record] = captured_tasks.pending
    result = captured_tasks.run_one(record)  # as a worker that does not know it
    assert result.status == "FAILURE" and isinstance(result.result, TaskNotRegistered)


def test_run_after_the_block_still_captures_what_tasks_send(empty_queues: None,
                                                            db: None) -> None:
    with capture_tasks() as captured:
        tasks.fan_out.delay(1)
    with mock.patch.object(broker, "publisher", _refuse_broker):
        captured.run()
    assert [c.name for c in captured] == ["tests.tasks.fan_out", "tests.tasks.multiply"]
    assert drain() == []


# -- transactions, with pytest-django ------------------------------------------------------------

@pytest.mark.django_db
def test_outside_atomic_is_captured_at_once(no_broker: None,
                                            captured_tasks: CapturedTasks) -> None:
    # The test runs inside pytest-django's TestCase transaction: that is not the code's own.
    assert transaction.get_connection().in_atomic_block
    tasks.multiply.delay(1, 2)
    assert len(captured_tasks) == 1


@pytest.mark.django_db
def test_inside_atomic_is_captured_on_commit(
        no_broker: None, captured_tasks: CapturedTasks,
        django_capture_on_commit_callbacks: OnCommit) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            tasks.multiply.delay(1, 2)
        assert captured_tasks == []
    assert [c.args for c in captured_tasks] == [[1, 2]]


@pytest.mark.django_db
def test_inside_atomic_without_a_commit_nothing_is_captured(
        no_broker: None, captured_tasks: CapturedTasks) -> None:
    with transaction.atomic():
        tasks.multiply.delay(1, 2)
    assert captured_tasks == []


@pytest.mark.django_db
def test_rollback_drops_the_capture(no_broker: None, captured_tasks: CapturedTasks,
                                    django_capture_on_commit_callbacks: OnCommit) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(RuntimeError), transaction.atomic():
            tasks.multiply.delay(1, 2)
            raise RuntimeError("rollback")
        with transaction.atomic():
            tasks.multiply.delay(3, 4)
    assert [c.args for c in captured_tasks] == [[3, 4]]


@pytest.mark.django_db(transaction=True)
def test_real_commit_is_captured_on_commit(no_broker: None,
                                           captured_tasks: CapturedTasks) -> None:
    with transaction.atomic():
        tasks.multiply.delay(1, 2)
        assert captured_tasks == []
    assert len(captured_tasks) == 1
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.multiply.delay(3, 4)
        raise RuntimeError("rollback")
    assert len(captured_tasks) == 1


@pytest.mark.django_db
def test_commit_after_the_block_is_still_captured(
        no_broker: None, django_capture_on_commit_callbacks: OnCommit) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        with capture_tasks() as captured, transaction.atomic():
            tasks.multiply.delay(1, 2)
        assert captured == []
    assert len(captured) == 1


@pytest.mark.django_db
def test_on_django_broker_the_capture_path_is_the_same(
        no_broker: None, settings: Any, captured_tasks: CapturedTasks,
        django_capture_on_commit_callbacks: OnCommit) -> None:
    from django_tasks_q.models import QueueMessage

    settings.TASKS_Q = {"BROKER_URL": "django://"}
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            tasks.multiply.delay(1, 2)
            assert captured_tasks == []
        with pytest.raises(RuntimeError), transaction.atomic():
            tasks.multiply.delay(3, 4)
            raise RuntimeError("rollback")
    assert [c.args for c in captured_tasks] == [[1, 2]]
    assert QueueMessage.objects.count() == 0


@pytest.mark.django_db
def test_run_commits_the_tasks_own_transactions(
        no_broker: None, captured_tasks: CapturedTasks,
        django_capture_on_commit_callbacks: OnCommit) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        tasks.fan_out_in_atomic.delay(7)
        results = captured_tasks.run()
    # As in a worker, the task's atomic() commits as it ends: what it sent on commit ran too,
    # and the test's own callback capture did not run it a second time.
    assert [r.get() for r in results] == [7, 49]
    assert len(captured_tasks) == 2 and callbacks == []


# -- without capture: publishing from tests ------------------------------------------------------

@pytest.mark.django_db
def test_in_a_testcase_outside_atomic_publishes_at_once(
        empty_queues: None, django_capture_on_commit_callbacks: OnCommit) -> None:
    first = tasks.multiply.delay(1, 2)
    assert [h["id"] for h, _, _ in drain()] == [first.id]
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            second = tasks.multiply.delay(3, 4)
        assert drain() == []
    assert [h["id"] for h, _, _ in drain()] == [second.id]


@pytest.mark.django_db
def test_eager_fixture_runs_tasks_when_sent(empty_queues: None, eager_tasks: None) -> None:
    with transaction.atomic():
        r = tasks.multiply.delay(6, 7)
        assert (r.status, r.get()) == ("SUCCESS", 42)  # at once: EAGER ignores the commit
    assert drain() == []


@pytest.mark.skipif(django.VERSION < (6, 0), reason="django.tasks is new in Django 6.0")
@pytest.mark.django_db
def test_django_tasks_through_our_backend_are_captured_and_run(
        no_broker: None, settings: Any, captured_tasks: CapturedTasks) -> None:
    settings.TASKS = {"default": {"BACKEND": "django_tasks_q.backend.TasksQBackend"}}
    enqueued = tasks.django_add.enqueue(2, 3)
    [sent] = captured_tasks
    assert (sent.task_id, sent.args, sent.task is not None) == (enqueued.id, [2, 3], True)
    [ran] = captured_tasks.run()
    assert (ran.status, ran.get()) == ("SUCCESS", 5)


def test_the_plugin_loads_before_django_is_set_up() -> None:
    import subprocess
    import sys

    script = ("import sys, django_tasks_q.testing.pytest\n"
              "from django.conf import settings\n"
              "assert not settings.configured, 'settings were read'\n"
              "loaded = [m for m in sys.modules if m.endswith('.models')\n"
              "          and m.startswith(('django_tasks_q', 'django.contrib'))]\n"
              "assert not loaded, loaded\n")
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- Django's TestCase ---------------------------------------------------------------------------

class CaptureInTestCase(TestCase):
    """The same behaviour under Django's own test runner classes."""

    def setUp(self) -> None:
        for queue in ("default", "high", "low"):
            drain(queue)
        patcher = mock.patch.object(broker, "publisher", _refuse_broker)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_outside_atomic_is_captured_at_once(self) -> None:
        with capture_tasks() as captured:
            r = tasks.multiply.delay(1, 2)
        self.assertEqual([c.task_id for c in captured], [r.id])

    def test_inside_atomic_is_captured_when_callbacks_run(self) -> None:
        with capture_tasks() as captured, self.captureOnCommitCallbacks(execute=True):
            with transaction.atomic():
                tasks.multiply.delay(1, 2)
            self.assertEqual(captured, [])
        self.assertEqual([c.args for c in captured], [[1, 2]])

    def test_inside_atomic_without_callbacks_nothing_is_captured(self) -> None:
        with capture_tasks() as captured, transaction.atomic():
            tasks.multiply.delay(1, 2)
        self.assertEqual(captured, [])

    def test_callbacks_captured_but_not_executed_capture_nothing(self) -> None:
        with (capture_tasks() as captured, self.captureOnCommitCallbacks() as callbacks,
              transaction.atomic()):
            tasks.multiply.delay(1, 2)
        self.assertEqual((len(callbacks), captured), (1, []))

    def test_rollback_drops_the_capture(self) -> None:
        with (capture_tasks() as captured, self.captureOnCommitCallbacks(execute=True),
              self.assertRaises(RuntimeError), transaction.atomic()):
            tasks.multiply.delay(1, 2)
            raise RuntimeError("rollback")
        self.assertEqual(captured, [])

    def test_run_executes_and_stores_failures(self) -> None:
        with capture_tasks() as captured:
            tasks.fan_out.delay(2)
            tasks.boom.delay("no")
        results = captured.run()
        self.assertEqual([r.status for r in results], ["SUCCESS", "FAILURE", "SUCCESS",
                                                       "SUCCESS"])
        self.assertEqual(TaskResult.objects.get(status="FAILURE").task_name, "tests.tasks.boom")
        self.assertIsInstance(captured[0], Captured)
        self.assertEqual(captured.pending, [])

    def test_run_commits_the_tasks_own_transactions(self) -> None:
        with capture_tasks() as captured:
            tasks.fan_out_in_atomic.delay(3)
            self.assertEqual([r.get() for r in captured.run()], [3, 9])
