"""Surface: the management commands, and the logging set-up they share."""

from __future__ import annotations

import logging

from django.core.management.base import CommandError

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


def configure_logging(loglevel: str) -> None:
    """Log to stderr at ``loglevel`` (a name such as INFO); CommandError for an unknown one."""
    level = str(loglevel).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise CommandError(f"Unknown log level {loglevel!r}; use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger("django_tasks_q").setLevel(level)
