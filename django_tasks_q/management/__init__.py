"""Surface: the management commands, and the logging set-up they share."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError

from django_tasks_q.log import LOG_FORMAT, TaskFormatter

__all__ = ["LOG_FORMAT", "configure_logging"]


def configure_logging(loglevel: str) -> None:
    """Apply ``-l/--loglevel`` where the project's ``LOGGING`` left the level unset, and log to
    stderr when it gave the root logger no handler; CommandError for an unknown level."""
    level = str(loglevel).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise CommandError(f"Unknown log level {loglevel!r}; use DEBUG, INFO, WARNING or ERROR")
    ours = logging.getLogger("django_tasks_q")
    if ours.level == logging.NOTSET:
        ours.setLevel(level)
    root = logging.getLogger()
    if root.handlers:
        return  # the project's handlers receive everything, formatted its way
    handler = logging.StreamHandler()
    handler.setFormatter(TaskFormatter())
    root.addHandler(handler)
    if not _root_level_configured(getattr(settings, "LOGGING", None)):
        root.setLevel(level)  # tasks' own loggers log at -l too


def _root_level_configured(config: Any) -> bool:
    """True when a ``LOGGING`` dict gives the root logger a level."""
    if not isinstance(config, dict):
        return False
    loggers = config.get("loggers") or {}
    return any(isinstance(entry, dict) and "level" in entry
               for entry in (config.get("root"), loggers.get("")))
