"""Surface: the Django app; imports every app's tasks.py and registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig


class TasksQConfig(AppConfig):
    """django-tasks-q's app configuration."""

    name = "django_tasks_q"
    verbose_name = "Tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import canvas, checks, registry

        checks.register()
        canvas.register_builtins()
        registry.autodiscover()
