"""The benchmark task for django-tasks-q: the shared body, nothing else."""
import common

from django_tasks_q import task


@task(name="bench.noop")
def noop(ts=None, sleep=0.0):
    common.body(ts, sleep)


def enqueue(**kw):
    """One client call, as the Celery side's ``noop.apply_async(kwargs=kw)``."""
    noop.apply_async(kwargs=kw)
