"""Celery app for the comparison: as the peer harness's sys_celery.py (prefork -c 2, no result
backend, prefetch multiplier 4), broker from BENCH_BROKER_URL, queue ``bench-celery``.

On ``django://`` Celery runs on django-tasks-q's own kombu transport over the same database:
Django is set up first, and importing ``django_tasks_q.broker`` registers kombu's alias.
"""
import os

import common

if common.BROKER_URL.startswith("django://"):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dtqbench.settings")
    import django

    django.setup()
    import django_tasks_q.broker  # noqa: E402,F401  (registers the django:// transport)

from celery import Celery  # noqa: E402

app = Celery("bench", broker=common.BROKER_URL)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
    task_default_queue=common.CELERY_QUEUE,
)


@app.task(name="bench.noop")
def noop(ts=None, sleep=0.0):
    common.body(ts, sleep)


def enqueue(**kw):
    noop.apply_async(kwargs=kw)
