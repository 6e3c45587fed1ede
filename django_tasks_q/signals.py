"""Foundation: signals sent around publishing, running and worker life."""

from __future__ import annotations

from django.dispatch import Signal

before_task_publish = Signal()
after_task_publish = Signal()
task_prerun = Signal()
task_postrun = Signal()
task_success = Signal()
task_failure = Signal()
task_retry = Signal()
task_revoked = Signal()
worker_ready = Signal()
worker_shutdown = Signal()
worker_process_init = Signal()
beat_init = Signal()
