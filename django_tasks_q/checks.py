"""Surface: system checks for the ``TASKS_Q`` settings (ids ``django_tasks_q.E…``/``W…``)."""

from __future__ import annotations

from typing import Any

from django.core import checks

from . import conf

SCHEMES = ("django", "redis", "rediss", "amqp", "amqps", "pyamqp", "memory")


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001 bad value, W001 unknown key, E002-E006 particular settings."""
    try:
        cfg = conf.get()
    except (TypeError, ValueError) as exc:
        return [checks.Error(str(exc), id="django_tasks_q.E001")]
    found: list[checks.CheckMessage] = []
    for key in cfg.unknown_keys:
        found.append(checks.Warning(
            f"TASKS_Q has an unknown key {key!r}; it is ignored.",
            hint=f"Known keys: {', '.join(sorted(conf.DEFAULTS))}.", id="django_tasks_q.W001"))
    if cfg.RESULTS not in conf.RESULT_MODES:
        found.append(checks.Error(f"TASKS_Q['RESULTS'] is {cfg.RESULTS!r}.",
                                  hint="Use 'errors', 'all' or 'none'.", id="django_tasks_q.E002"))
    scheme = cfg.BROKER_URL.split("://", 1)[0]
    if scheme not in SCHEMES:
        found.append(checks.Error(
            f"TASKS_Q['BROKER_URL'] has the scheme {scheme!r}.",
            hint="Use django://, redis://, rediss://, amqp://, amqps:// or memory://.",
            id="django_tasks_q.E003"))
    if cfg.queues_explicit and cfg.DEFAULT_QUEUE not in cfg.QUEUES:
        found.append(checks.Error(
            f"TASKS_Q['DEFAULT_QUEUE'] {cfg.DEFAULT_QUEUE!r} is not in TASKS_Q['QUEUES'].",
            hint="Add it to QUEUES, or pick one of them as DEFAULT_QUEUE.",
            id="django_tasks_q.E004"))
    keepalive = cfg.AUTOSCALE_KEEPALIVE
    if isinstance(keepalive, bool) or not isinstance(keepalive, int | float) or keepalive <= 0:
        found.append(checks.Error(
            f"TASKS_Q['AUTOSCALE_KEEPALIVE'] is {keepalive!r}.",
            hint="Use a number of seconds above 0: how long an extra pool child may stay idle "
                 "before taskworker --autoscale lets it go.",
            id="django_tasks_q.E005"))
    found.extend(_check_beat_schedule(cfg.BEAT_SCHEDULE))
    return found


def _check_beat_schedule(entries: Any) -> list[checks.CheckMessage]:
    from .beat import code_entry  # the models are loaded by the time checks run

    if not isinstance(entries, dict):
        return [checks.Error(f"TASKS_Q['BEAT_SCHEDULE'] is {type(entries).__name__}.",
                             hint="Use a dict: schedule name -> {'task': ..., 'schedule': ...}.",
                             id="django_tasks_q.E006")]
    found: list[checks.CheckMessage] = []
    for name, entry in entries.items():
        try:
            code_entry(name, entry)
        except ValueError as exc:
            found.append(checks.Error(str(exc), hint="See the Periodic tasks page of the docs.",
                                      id="django_tasks_q.E006"))
    return found


def register() -> None:
    """Register the checks with Django."""
    checks.register(check_settings, "django_tasks_q")
