"""Pruning old task results: in batches, on demand (taskctl prune) and on a schedule."""

from __future__ import annotations

import io
import time
import tracemalloc
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from django_tasks_q import registry, results
from django_tasks_q.models import TaskResult, TaskState

pytestmark = pytest.mark.django_db(transaction=True)


def make_rows(count: int, age: timedelta, prefix: str) -> None:
    done = timezone.now() - age
    TaskResult.objects.bulk_create(
        TaskResult(task_id=f"{prefix}-{i}", task_name="t", status=TaskState.FAILURE,
                   date_done=done) for i in range(count))


def test_prune_deletes_expired_rows_batch_by_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "PRUNE_BATCH", 3)
    make_rows(10, timedelta(days=30), "old")
    make_rows(2, timedelta(days=1), "new")
    seen: list[int] = []
    assert results.prune(progress=seen.append) == 10
    assert seen == [3, 6, 9, 10]
    assert sorted(TaskResult.objects.values_list("task_id", flat=True)) == ["new-0", "new-1"]


def test_taskctl_prune_reports_progress_and_takes_another_cut_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "PRUNE_BATCH", 2)
    make_rows(3, timedelta(hours=2), "old")
    out = io.StringIO()
    call_command("taskctl", "prune", stdout=out)
    assert "Deleted 0 task result(s)." in out.getvalue()  # younger than RESULT_EXPIRES (7 days)
    out = io.StringIO()
    call_command("taskctl", "prune", "--older-than", "3600", stdout=out)
    assert out.getvalue().splitlines()[1:] == ["  2 deleted", "  3 deleted",
                                               "Deleted 3 task result(s)."]
    with pytest.raises(CommandError, match="--older-than must be 0 or more seconds"):
        call_command("taskctl", "prune", "--older-than", "-1")


def test_the_built_in_task_prunes() -> None:
    make_rows(4, timedelta(days=30), "old")
    assert registry.get("django_tasks_q.prune_results")() == 4
    assert not TaskResult.objects.exists()


@pytest.mark.broker  # slow: runs with the service suites, on SQLite and on PostgreSQL
def test_a_million_expired_rows_go_in_batches_without_loading_them() -> None:
    count = 1_000_000
    table = TaskResult._meta.db_table
    old = timezone.now() - timedelta(days=30)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"INSERT INTO {table} (task_id, task_name, status, args, kwargs, traceback, "
                f"worker, queue, retries, date_created, date_done) SELECT 'm-' || n, 't', "
                f"'FAILURE', '[]', '{{}}', '', '', '', 0, %s, %s "
                f"FROM generate_series(1, %s) AS n", [old, old, count])
        else:
            cursor.execute(
                f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %s) "
                f"INSERT INTO {table} (task_id, task_name, status, args, kwargs, traceback, "
                f"worker, queue, retries, date_created, date_done) SELECT 'm-' || i, 't', "
                f"'FAILURE', '[]', '{{}}', '', '', '', 0, %s, %s FROM n",
                [count, old.isoformat(" "), old.isoformat(" ")])
    make_rows(3, timedelta(days=1), "keep")
    tracemalloc.start()
    started = time.monotonic()
    try:
        deleted = results.prune()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.monotonic() - started
    assert deleted == count
    assert TaskResult.objects.count() == 3
    assert peak < 20 * 2**20, f"prune held {peak / 2**20:.0f} MiB at once"
    print(f"\npruned {count} rows on {connection.vendor} in {took:.1f}s, "
          f"peak {peak / 2**20:.1f} MiB traced")
