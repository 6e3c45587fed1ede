"""One task run: outcomes, stored rows per RESULTS mode, retries, eager mode, AsyncResult."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from django_tasks_q import AsyncResult, execute, message
from django_tasks_q.exceptions import ResultsNotKept, TaskNotRegistered, TimeoutError
from django_tasks_q.models import TaskResult

from . import tasks

pytestmark = pytest.mark.django_db


def msg(name: str, *args: object, **kwargs: object) -> message.TaskMessage:
    return message.TaskMessage(id=message.new_id(), name=name, args=list(args), kwargs=kwargs,
                               queue="default")


def test_success_in_errors_mode_writes_nothing(settings: pytest.FixtureRequest) -> None:
    outcome = execute.run(msg("tests.tasks.multiply", 2, 3))
    assert outcome.status == "SUCCESS" and outcome.value == 6
    # multiply keeps results="all"; the default mode keeps nothing for a success:
    TaskResult.objects.all().delete()
    settings.TASKS_Q = {"BROKER_URL": "memory://", "RESULTS": "errors"}
    assert execute.run(msg("tests.tasks.quiet")).status == "SUCCESS"
    assert TaskResult.objects.count() == 0


def test_all_mode_stores_success() -> None:
    m = msg("tests.tasks.multiply", 4, 5)
    execute.run(m, hostname="w1")
    row = TaskResult.objects.get(task_id=m.id)
    assert (row.status, row.result, row.worker, row.queue) == ("SUCCESS", 20, "w1", "default")
    assert row.date_started and row.date_done and row.args == [4, 5]


def test_failure_is_stored_once_with_everything() -> None:
    m = msg("tests.tasks.boom", "bad input")
    m.retries = 2
    outcome = execute.run(m, hostname="w1")
    assert outcome.status == "FAILURE" and outcome.error == "ValueError: bad input"
    row = TaskResult.objects.get(task_id=m.id)
    assert row.status == "FAILURE" and row.task_name == "tests.tasks.boom"
    assert row.result["exc_type"] == "ValueError" and row.result["exc_message"] == "bad input"
    assert "raise ValueError(message)" in row.traceback
    assert (row.args, row.kwargs, row.retries, row.worker) == (["bad input"], {}, 2, "w1")
    assert row.date_started and row.date_done


def test_none_mode_stores_no_failure(settings: pytest.FixtureRequest) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://", "RESULTS": "none"}
    assert execute.run(msg("tests.tasks.boom", "x")).status == "FAILURE"
    assert TaskResult.objects.count() == 0


def test_unknown_task_fails_naming_task_not_registered() -> None:
    m = msg("nowhere.tasks.missing")
    assert execute.run(m).status == "FAILURE"
    row = TaskResult.objects.get(task_id=m.id)
    assert row.result["exc_type"] == "TaskNotRegistered" and "tasks.py" in row.result["exc_message"]
    with pytest.raises(TaskNotRegistered):
        AsyncResult(m.id).get()


def test_expired_task_is_revoked_with_reason() -> None:
    m = msg("tests.tasks.multiply", 1, 1)
    m.expires = datetime.now(UTC) - timedelta(seconds=1)
    assert execute.run(m).status == "REVOKED"
    row = TaskResult.objects.get(task_id=m.id)
    assert row.status == "REVOKED" and row.result["reason"] == "expired"


def test_autoretry_asks_for_retry_with_backoff_then_fails_once() -> None:
    m = msg("tests.tasks.always_flaky")
    first = execute.run(m)
    assert first.status == "RETRY"
    due = datetime.fromisoformat(first.retry_eta or "")
    assert 0.5 < (due - datetime.now(UTC)).total_seconds() <= 1.0  # 1 * 2**0
    m.retries = 1
    due = datetime.fromisoformat(execute.run(m).retry_eta or "")
    assert 1.5 < (due - datetime.now(UTC)).total_seconds() <= 2.0  # 1 * 2**1
    assert TaskResult.objects.count() == 0  # retries store nothing
    m.retries = 2
    assert execute.run(m).status == "FAILURE"
    assert TaskResult.objects.get(task_id=m.id).retries == 2


def test_backoff_is_capped_and_jittered() -> None:
    t = tasks.always_flaky
    t.retry_backoff_max, t.retry_jitter = 5, True
    try:
        values = [t.retry_countdown(10) for _ in range(50)]
    finally:
        t.retry_backoff_max, t.retry_jitter = 600, False
    assert all(0 <= v <= 5 for v in values) and len(set(values)) > 1
    assert tasks.multiply.retry_countdown(3) == 180  # no backoff: default_retry_delay


def test_eager_mode_runs_inline_with_retries(settings: pytest.FixtureRequest) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://", "EAGER": True}
    r = tasks.retries_then_ok.delay(2)
    assert r.status == "SUCCESS" and r.get() == 2
    tasks.calls.clear()
    failed = tasks.always_flaky.delay()
    assert failed.status == "FAILURE" and len(tasks.calls) == 3
    with pytest.raises(tasks.Flaky):
        failed.get()
    assert isinstance(failed.get(propagate=False), tasks.Flaky)


def test_base_class_handlers_are_called() -> None:
    tasks.Reporting.reported.clear()
    m = msg("tests.tasks.reported_failure")
    execute.run(m)
    assert tasks.Reporting.reported == [(m.id, "RuntimeError('reported')")]


def test_get_raises_at_once_when_results_are_not_kept() -> None:
    r = AsyncResult("never-stored", task=tasks.quiet)
    with pytest.raises(ResultsNotKept, match="results='none'"):
        r.get(timeout=30)
    with pytest.raises(ResultsNotKept, match="keeps only failures.*results='all'"):
        AsyncResult("x", task=tasks.boom).get(timeout=30)


def test_get_waits_and_times_out_when_results_are_kept() -> None:
    r = AsyncResult("not-yet", task=tasks.multiply)
    assert r.status == "PENDING" and not r.ready()
    with pytest.raises(TimeoutError):
        r.get(timeout=0.2)


def test_get_reraises_stored_failure_with_its_class() -> None:
    m = msg("tests.tasks.boom", "stored")
    execute.run(m)
    r = AsyncResult(m.id)
    assert r.failed() and r.ready() and not r.successful()
    with pytest.raises(ValueError, match="stored"):
        r.get()
    assert "ValueError" in (r.traceback or "")
    assert isinstance(r.result, ValueError)


def test_nested_exception_class_is_rebuilt() -> None:
    from django_tasks_q import results
    from testproject.testapp.models import Order

    exc = results.rebuild_exception(execute.exception_info(Order.DoesNotExist("gone")))
    assert isinstance(exc, Order.DoesNotExist)
    unknown = results.rebuild_exception({"exc_type": "Gone", "exc_module": "no.such.module",
                                         "exc_message": "m"})
    assert type(unknown).__name__ == "Gone" and str(unknown) == "m"


def test_revoke_marks_revoked() -> None:
    r = AsyncResult("to-revoke")
    r.revoke()
    assert r.status == "REVOKED"


def test_bare_id_waits_rather_than_guessing_the_mode() -> None:
    with pytest.raises(TimeoutError):
        AsyncResult("unknown-task-id").get(timeout=0.2)


def test_revoke_leaves_a_finished_outcome_alone() -> None:
    m = msg("tests.tasks.multiply", 2, 2)
    execute.run(m)
    AsyncResult(m.id).revoke()
    assert AsyncResult(m.id).get() == 4


def test_return_value_that_cannot_be_stored_is_a_clear_failure() -> None:
    m = msg("tests.tasks.echo", "1.50")
    assert execute.run(m).status == "SUCCESS"  # Decimal is stored (as a string)
    assert AsyncResult(m.id).get() == "1.50"
    m = msg("tests.tasks.echo", "set")
    outcome = execute.run(m)
    assert outcome.status == "FAILURE" and "cannot be stored as JSON" in outcome.error
    assert TaskResult.objects.get(task_id=m.id).status == "FAILURE"


def test_soft_time_limit_interrupts_the_task_in_the_main_thread() -> None:
    import time

    from django_tasks_q.exceptions import SoftTimeLimitExceeded

    start = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded, match=r"soft time limit \(0.2s\)"), \
            execute.soft_time_limit(0.2):
        time.sleep(5)
    assert time.monotonic() - start < 2
    with execute.soft_time_limit(0.2):
        pass  # disarmed on the way out: nothing fires later
    time.sleep(0.3)


def test_the_request_tells_a_task_about_its_invocation() -> None:
    m = msg("tests.tasks.whoami")
    m.priority = 7
    outcome = execute.run(m, hostname="w1")
    assert outcome.value == {"id": m.id, "queue": "default", "priority": 7, "hostname": "w1",
                             "called_directly": False}
    assert tasks.whoami()["called_directly"] is True
