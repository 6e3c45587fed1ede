"""Surface: system checks of settings and tasks (ids ``django_tasks_q.E0…``/``W0…``)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from django.core import checks

from . import conf

if TYPE_CHECKING:

    from .task import Task

SCHEMES = ("django", "redis", "rediss", "amqp", "amqps", "pyamqp", "memory")
#: Schemes of databases people write when they mean the embedded broker.
DATABASE_SCHEMES = ("postgres", "postgresql", "pgsql", "sqlite", "sqlite3", "mysql")
#: Serializers whose decoding runs code chosen by whoever wrote the message.
UNSAFE_CONTENT = {"pickle": "application/x-python-serialize"}


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001 bad value, W001 unknown key, E002-E008, E010-E011, E013-E014 and W002 particular
    settings."""
    try:
        cfg = conf.get()
    except (TypeError, ValueError) as exc:
        return [checks.Error(str(exc), id="django_tasks_q.E001")]
    found: list[checks.CheckMessage] = []
    for key in cfg.unknown_keys:
        close = difflib.get_close_matches(str(key).upper(), conf.DEFAULTS, n=1)
        guess = f"Did you mean {close[0]!r}? " if close else ""
        found.append(checks.Warning(
            f"TASKS_Q has an unknown key {key!r}; it is ignored.",
            hint=f"{guess}Known keys: {', '.join(sorted(conf.DEFAULTS))}.",
            id="django_tasks_q.W001"))
    if cfg.RESULTS not in conf.RESULT_MODES:
        found.append(checks.Error(f"TASKS_Q['RESULTS'] is {cfg.RESULTS!r}.",
                                  hint="Use 'errors', 'all' or 'none'.", id="django_tasks_q.E002"))
    found.extend(_check_broker_url(cfg.BROKER_URL))
    try:
        conf.max_priority(cfg.BROKER_OPTIONS)
    except ValueError as exc:
        found.append(checks.Error(
            str(exc), hint="Leave it out for queues without priorities (RabbitMQ's work per task "
                           "is lowest), or set 9; see the Brokers page of the docs.",
            id="django_tasks_q.E014"))
    if cfg.queues_explicit and cfg.DEFAULT_QUEUE not in cfg.QUEUES:
        found.append(checks.Error(
            f"TASKS_Q['DEFAULT_QUEUE'] {cfg.DEFAULT_QUEUE!r} is not in TASKS_Q['QUEUES'].",
            hint="Add it to QUEUES, or pick one of them as DEFAULT_QUEUE.",
            id="django_tasks_q.E004"))
    keepalive = cfg.AUTOSCALE_KEEPALIVE
    if not is_seconds(keepalive):
        found.append(checks.Error(
            f"TASKS_Q['AUTOSCALE_KEEPALIVE'] is {keepalive!r}.",
            hint="Use a number of seconds above 0: how long an extra pool child may stay idle "
                 "before taskworker --autoscale lets it go.",
            id="django_tasks_q.E005"))
    found.extend(_check_beat_schedule(cfg.BEAT_SCHEDULE))
    problem = _limits_problem(cfg.TIME_LIMIT, cfg.SOFT_TIME_LIMIT, "TASKS_Q['TIME_LIMIT']",
                              "TASKS_Q['SOFT_TIME_LIMIT']")
    if problem:
        found.append(checks.Error(problem[0], hint=problem[1], id="django_tasks_q.E008"))
    found.extend(_check_routes(cfg))
    found.extend(_check_accept_content(cfg.ACCEPT_CONTENT))
    found.extend(_check_worker_extensions())
    return found


def _check_worker_extensions() -> list[checks.CheckMessage]:
    """E013: a WORKER_EXTENSIONS entry that does not name a WorkerExtension subclass."""
    from .exceptions import ImproperlyConfigured
    from .extensions import configured_classes

    try:
        configured_classes()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="See the Extending the worker page of the docs.",
                             id="django_tasks_q.E013")]
    return []


def is_seconds(value: Any) -> bool:
    """True for a number of seconds above 0."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def _shown_url(url: str) -> str:
    """``url`` fit for a message: everything before the host (user and password) masked.

    Not through kombu: a URL kombu cannot parse must be shown safely too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "****@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def _check_broker_url(url: Any) -> list[checks.CheckMessage]:
    """E007 for a URL that cannot be read, E003 for a scheme this app cannot use."""
    from kombu.utils.url import parse_url

    example = "for example 'redis://127.0.0.1:6379/0', 'amqp://user:password@host:5672//' or " \
              "'django://'"
    if not isinstance(url, str) or "://" not in url:
        shown = _shown_url(url) if isinstance(url, str) else type(url).__name__
        return [checks.Error(
            f"TASKS_Q['BROKER_URL'] is {shown!r}, which is not a broker URL (scheme://…).",
            hint=f"Write the URL in full, {example}.", id="django_tasks_q.E007")]
    scheme = url.split("://", 1)[0]
    if scheme not in SCHEMES:
        hint = ("Use django:// (the embedded broker, on your DATABASES), redis:// or rediss:// "
                "(Redis), amqp://, amqps:// or pyamqp:// (RabbitMQ), or memory:// (tests in one "
                "process).")
        if scheme.lower() in SCHEMES:
            hint = f"Write the scheme in lower case: {scheme.lower()}://…"
        elif scheme.lower() in DATABASE_SCHEMES:
            hint = ("To keep messages in your database, write 'django://': it uses the "
                    "'default' entry of DATABASES (BROKER_OPTIONS['database'] picks another).")
        return [checks.Error(
            f"TASKS_Q['BROKER_URL'] ({_shown_url(url)}) has the scheme {scheme!r}, which "
            f"django-tasks-q cannot use as a broker.", hint=hint, id="django_tasks_q.E003")]
    try:
        parse_url(url)
    except (ValueError, TypeError, KeyError) as exc:
        reason = str(exc)
        userinfo = url.split("://", 1)[1].rsplit("@", 1)[0] if "@" in url else ""
        for secret in (userinfo, userinfo.partition(":")[2]):
            reason = reason.replace(secret, "****") if secret else reason
        return [checks.Error(
            f"TASKS_Q['BROKER_URL'] ({_shown_url(url)}) cannot be read: {reason}.",
            hint=f"Fix the URL ({example}); characters such as '@', ':' or '/' in a password "
                 f"must be percent-encoded.", id="django_tasks_q.E007")]
    return []


def _limits_problem(hard: Any, soft: Any, hard_name: str,
                    soft_name: str) -> tuple[str, str] | None:
    """(message, hint) when a hard/soft time limit pair is unusable, else None."""
    for value, name in ((hard, hard_name), (soft, soft_name)):
        if value is not None and not is_seconds(value):
            return (f"{name} is {value!r}.", "Use a number of seconds above 0, or None.")
    if hard is not None and soft is not None and soft >= hard:
        return (f"{soft_name} ({soft:g}s) is not below {hard_name} ({hard:g}s): the hard limit "
                f"stops the task first, so SoftTimeLimitExceeded is never raised in it.",
                "Make the soft limit lower than the hard one, leaving the task time to clean "
                "up (for example time_limit=60, soft_time_limit=50).")
    return None


def _check_routes(cfg: conf.Settings) -> list[checks.CheckMessage]:
    """E010: ROUTES sending tasks to a queue QUEUES does not declare."""
    if not isinstance(cfg.ROUTES, dict):
        return [checks.Error(f"TASKS_Q['ROUTES'] is {type(cfg.ROUTES).__name__}.",
                             hint="Use a dict: task name or glob -> queue name, or -> "
                                  "{'queue': ..., 'priority': ...}.", id="django_tasks_q.E010")]
    if not cfg.queues_explicit:
        return []
    found: list[checks.CheckMessage] = []
    for pattern, target in cfg.ROUTES.items():
        name = target.get("queue") if isinstance(target, dict) else target
        if name is not None and str(name) not in cfg.QUEUES:
            found.append(_undeclared(f"TASKS_Q['ROUTES'][{pattern!r}] sends tasks to queue",
                                     str(name), cfg.QUEUES))
    return found


def _undeclared(what: str, name: str, queues: list[str]) -> checks.Error:
    return checks.Error(
        f"{what} {name!r}, which is not in TASKS_Q['QUEUES'] ({', '.join(queues)}): sending "
        f"to it fails with UnknownQueue, and taskworker without -Q does not consume it.",
        hint=f"Add {name!r} to TASKS_Q['QUEUES'], or send these tasks to one of its queues.",
        id="django_tasks_q.E010")


def _content_types(accept: Sequence[str]) -> set[str]:
    """The content types ``accept`` (serializer names or content types) stands for."""
    from kombu.serialization import registry

    return {value if "/" in value else registry.name_to_type.get(value, value)
            for value in accept}


def _decodes(value: str) -> bool:
    """True when kombu can really encode and decode ``value`` (a name or a content type)."""
    from kombu.serialization import dumps, loads, registry

    name = registry.type_to_name.get(value, value)
    if name not in registry.name_to_type:
        return False
    try:
        content_type, encoding, data = dumps([[], {}, {}], serializer=name)
        loads(data, content_type, encoding, accept=[content_type])
    except Exception:  # noqa: BLE001 - e.g. SerializerNotInstalled: PyYAML or msgpack missing
        return False
    return True


def _check_accept_content(accept: Any) -> list[checks.CheckMessage]:
    """E011 for an ACCEPT_CONTENT a worker cannot use, W002 for an unsafe one."""
    if isinstance(accept, str) or not isinstance(accept, list | tuple) or not all(
            isinstance(value, str) for value in accept):
        return [checks.Error(f"TASKS_Q['ACCEPT_CONTENT'] is {accept!r}.",
                             hint="Use a list of serializer names, such as ['json'].",
                             id="django_tasks_q.E011")]
    unusable = [value for value in accept if not _decodes(value)]
    if unusable:
        return [checks.Error(
            f"TASKS_Q['ACCEPT_CONTENT'] names {', '.join(map(repr, unusable))}, which workers "
            f"cannot decode.", hint="Use 'json' and, if you must, 'pickle'; 'yaml' and "
            "'msgpack' need PyYAML or msgpack installed.", id="django_tasks_q.E011")]
    types = _content_types(accept)
    if "application/json" not in types:
        return [checks.Error(
            "TASKS_Q['ACCEPT_CONTENT'] leaves out 'json': django-tasks-q sends every task as "
            "JSON (delay(), retries, taskbeat), so workers would drop them all.",
            hint="Add 'json' to the list.", id="django_tasks_q.E011")]
    return [checks.Warning(
        f"TASKS_Q['ACCEPT_CONTENT'] includes {name!r}: loading such a message can run any code "
        f"its sender chose, so anyone who can publish to the broker can run code on your "
        f"workers.", hint="Have producers send JSON (in Celery, task_serializer = 'json') and "
        "remove it; if you must keep it, let only trusted clients reach the broker.",
        id="django_tasks_q.W002")
        for name, content_type in UNSAFE_CONTENT.items() if content_type in types]


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


def check_tasks(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E009 a task's time limits, E010 a task's queue, for every registered task."""
    from . import registry

    try:
        cfg = conf.get()
    except (TypeError, ValueError):
        return []  # E001, from check_settings
    found: list[checks.CheckMessage] = []
    for name in registry.names():
        task = registry.get(name)
        if task.time_limit is not None or task.soft_time_limit is not None:
            found.extend(_check_task_limits(task, cfg))
        if (task.queue and cfg.queues_explicit and _routed_queue(name, cfg.ROUTES) is None
                and task.queue not in cfg.QUEUES):
            found.append(_undeclared(f"Task {name!r} is sent to its queue", str(task.queue),
                                     cfg.QUEUES))
    return found


def _check_task_limits(task: Task[Any, Any], cfg: conf.Settings) -> list[checks.CheckMessage]:
    # A limit the task leaves unset comes from the settings: the pair that applies is checked
    # (a setting that is no number of seconds is E008's to report, not each task's).
    hard, hard_name = task.time_limit, "its time_limit"
    if hard is None and is_seconds(cfg.TIME_LIMIT):
        hard, hard_name = cfg.TIME_LIMIT, "TASKS_Q['TIME_LIMIT']"
    soft, soft_name = task.soft_time_limit, "its soft_time_limit"
    if soft is None and is_seconds(cfg.SOFT_TIME_LIMIT):
        soft, soft_name = cfg.SOFT_TIME_LIMIT, "TASKS_Q['SOFT_TIME_LIMIT']"
    problem = _limits_problem(hard, soft, hard_name, soft_name)
    if problem is None:
        return []
    return [checks.Error(f"Task {task.name!r}: {problem[0]}", hint=problem[1],
                         id="django_tasks_q.E009")]


def _routed_queue(name: str, routes: Any) -> str | None:
    """The queue ROUTES sends task ``name`` to, if any (as client.route reads it)."""
    if not isinstance(routes, dict):
        return None
    routed = routes.get(name)
    if routed is None:
        routed = next((v for k, v in routes.items() if fnmatchcase(name, str(k))), None)
    if isinstance(routed, dict):
        routed = routed.get("queue")
    return None if routed is None else str(routed)


def register() -> None:
    """Register the checks with Django (those of start-up too)."""
    from .startchecks import STARTUP, check_start

    checks.register(check_settings, "django_tasks_q")
    checks.register(check_tasks, "django_tasks_q")
    checks.register(check_start, "django_tasks_q", STARTUP)
