"""Surface: the Django app; imports every app's tasks.py, registers the system checks, and
has what a request published confirmed at its end."""

from __future__ import annotations

from django.apps import AppConfig


class TasksQConfig(AppConfig):
    """django-tasks-q's app configuration."""

    name = "django_tasks_q"
    verbose_name = "Tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import request_finished

        from . import broker, canvas, checks, registry

        checks.register()
        # Tasks a request sent are confirmed (RabbitMQ, Redis) before its process takes the next.
        request_finished.connect(broker.flush_or_log, dispatch_uid="django_tasks_q.flush")
        canvas.register_builtins()
        registry.autodiscover()
