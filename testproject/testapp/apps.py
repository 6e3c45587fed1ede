"""The example shop app."""

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    """Orders, their tasks, and the ``demo`` command."""

    name = "testproject.testapp"
    label = "testapp"
    verbose_name = "Example shop"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_tasks_q.extensions import register_worker_extension

        from .extensions import LongTaskWatchdog

        # Every taskworker of the project runs it (OrderFeed comes from the settings instead).
        register_worker_extension(LongTaskWatchdog)
