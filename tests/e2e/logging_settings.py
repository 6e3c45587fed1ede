"""Settings for tests/e2e/test_logging.py: the example project's, with a ``LOGGING`` of its own."""

from testproject.settings import *  # noqa: F403

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"task": {"()": "django_tasks_q.log.TaskFilter"}},
    "formatters": {"project": {
        "format": "PROJECT %(levelname)s %(name)s %(task_name)s[%(task_id)s] %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "filters": ["task"],
                            "formatter": "project"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {
        # The package at WARNING, but its worker lines (ready, succeeded) at INFO.
        "django_tasks_q": {"level": "WARNING"},
        "django_tasks_q.worker": {"level": "INFO"},
    },
}
