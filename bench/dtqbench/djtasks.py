"""The benchmark task for django-tasks-db (``djtasks``): the shared body, on its DatabaseBackend.

Loaded by the driver and by ``manage.py db_worker`` with BENCH_APPS including ``djtasks``.
"""
import common

try:  # Django 6 has the tasks framework; before it, the django-tasks backport
    from django.tasks import task
except ImportError:
    from django_tasks import task


@task()
def noop(ts=None, sleep=0.0):
    common.body(ts, sleep)


def enqueue(**kw):
    noop.enqueue(**kw)
