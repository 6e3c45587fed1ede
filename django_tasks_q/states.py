"""Definitions: task states, named as Celery names them."""

from __future__ import annotations

from django.db import models


class TaskState(models.TextChoices):
    """Task states, named as Celery names them."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


READY_STATES = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED})
