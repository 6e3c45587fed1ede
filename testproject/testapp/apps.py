"""The example shop app."""

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    """Orders, their tasks, and the ``demo`` command."""

    name = "testproject.testapp"
    label = "testapp"
    verbose_name = "Example shop"
    default_auto_field = "django.db.models.BigAutoField"
