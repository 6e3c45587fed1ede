"""Foundation: the ``TASKS_Q`` settings, read at call time and cached until settings change."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

RESULT_MODES = ("errors", "all", "none")

DEFAULTS: dict[str, Any] = {
    "BROKER_URL": "django://",
    "BROKER_OPTIONS": {},
    "RESULTS": "errors",
    "RESULT_EXPIRES": timedelta(days=7),
    "DEFAULT_QUEUE": "default",
    "QUEUES": ["default"],
    "ROUTES": {},
    "EAGER": False,
    "ENQUEUE_ON_COMMIT": True,
    "ACKS_LATE": True,
    "MAX_DELIVERIES": 3,
    "SHUTDOWN_GRACE": 60.0,
    "AUTOSCALE_KEEPALIVE": 30.0,
    "TIME_LIMIT": None,
    "SOFT_TIME_LIMIT": None,
    "BEAT_SCHEDULE": {},
    "TIMEZONE": None,
    # What a worker decodes; this app always sends JSON. "pickle" lets senders run code.
    "ACCEPT_CONTENT": ["json"],
    # Dotted paths of WorkerExtension subclasses every taskworker runs (extensions.py).
    "WORKER_EXTENSIONS": [],
}


def max_priority(options: dict[str, Any]) -> int | None:
    """The ``x-max-priority`` RabbitMQ queues are declared with (``BROKER_OPTIONS
    ["max_priority"]`` in ``options``), or None: no priorities, as Celery declares queues by
    default.

    A classic queue with priorities keeps one queue per level and looks through every empty
    level above a message's for each delivery: the broker's work per task grows with the
    levels, about half as much again with ten for messages sent without a priority."""
    value = options.get("max_priority")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
        raise ValueError(f"TASKS_Q['BROKER_OPTIONS']['max_priority'] must be an int from 1 to "
                         f"255 (9 honours all ten priorities) or None, not {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """A resolved snapshot of ``settings.TASKS_Q`` merged over the defaults."""

    BROKER_URL: str
    BROKER_OPTIONS: dict[str, Any]
    RESULTS: str
    RESULT_EXPIRES: timedelta
    DEFAULT_QUEUE: str
    QUEUES: list[str]
    ROUTES: dict[str, Any]
    EAGER: bool
    ENQUEUE_ON_COMMIT: bool
    ACKS_LATE: bool
    MAX_DELIVERIES: int
    SHUTDOWN_GRACE: float | None
    AUTOSCALE_KEEPALIVE: float
    TIME_LIMIT: float | None
    SOFT_TIME_LIMIT: float | None
    BEAT_SCHEDULE: dict[str, Any]
    TIMEZONE: str
    ACCEPT_CONTENT: list[str]
    WORKER_EXTENSIONS: list[str]
    unknown_keys: tuple[str, ...] = field(default=())
    queues_explicit: bool = False


def user_settings() -> dict[str, Any]:
    """The raw ``TASKS_Q`` dict from Django settings (empty when unset)."""
    value = getattr(django_settings, "TASKS_Q", None) or {}
    if not isinstance(value, dict):
        raise TypeError(f"settings.TASKS_Q must be a dict, got {type(value).__name__}")
    return value


@functools.cache
def get() -> Settings:
    """The current settings; cached, and reset whenever Django's settings change."""
    raw = user_settings()
    merged = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS}}
    expires = merged["RESULT_EXPIRES"]
    if not isinstance(expires, timedelta):
        merged["RESULT_EXPIRES"] = timedelta(seconds=float(expires))
    merged["TIMEZONE"] = merged["TIMEZONE"] or getattr(django_settings, "TIME_ZONE", None) or "UTC"
    # Without an explicit list, the queues are just the default one, whatever it is named.
    merged["QUEUES"] = list(raw["QUEUES"]) if "QUEUES" in raw else [merged["DEFAULT_QUEUE"]]
    return Settings(
        **merged,
        unknown_keys=tuple(sorted(k for k in raw if k not in DEFAULTS)),
        queues_explicit="QUEUES" in raw,
    )


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "TASKS_Q":
        get.cache_clear()
