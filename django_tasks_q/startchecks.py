"""Surface: the checks taskworker and taskbeat run as they start (migrations, SQLite, leases)."""

from __future__ import annotations

import contextlib
import pkgutil
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from django.core import checks

from . import conf
from .checks import is_seconds

if TYPE_CHECKING:
    from django.core.management.base import BaseCommand

    from .worker.main import WorkerOptions

#: The tag of the checks ``taskworker`` and ``taskbeat`` run, with databases, as they start.
STARTUP = "django_tasks_q_startup"
#: This app's label, whose migrations E012 checks.
APP_LABEL = "django_tasks_q"
#: transport/django.py's lease when BROKER_OPTIONS sets no ``visibility_timeout``.
DJANGO_VISIBILITY_TIMEOUT = 60.0


@dataclass(frozen=True)
class _Start:
    """A taskworker (``worker`` set) or taskbeat being started."""

    worker: WorkerOptions | None


_starting: ContextVar[_Start | None] = ContextVar("django_tasks_q_starting", default=None)


def start_databases() -> list[str]:
    """The database aliases a worker or taskbeat uses: where this app's tables must be."""
    from django.apps import apps
    from django.db import router

    aliases = {router.db_for_write(model)
               for model in apps.get_app_config("django_tasks_q").get_models()}
    cfg = conf.get()
    if str(cfg.BROKER_URL).startswith("django://"):
        aliases.add(str(_broker_option(cfg, "database", "default")))
    return sorted(aliases)


def _broker_option(cfg: conf.Settings, key: str, default: Any) -> Any:
    options = cfg.BROKER_OPTIONS
    return options.get(key, default) if isinstance(options, dict) else default


@contextlib.contextmanager
def starting(worker: WorkerOptions | None) -> Iterator[None]:
    """Within it, the start-up checks run: for taskbeat, or for ``worker`` (taskworker)."""
    token = _starting.set(_Start(worker))
    try:
        yield
    finally:
        _starting.reset(token)


def run_start_checks(command: BaseCommand, worker: WorkerOptions | None = None) -> None:
    """Run the start-up checks through ``command`` (SystemCheckError on an error).

    Only taskworker and taskbeat run them: they read the database (E012, W003; never while
    ``migrate``, which passes ``databases`` too, runs its checks) or look at how the worker is
    started (W004, W005).
    """
    try:
        databases = start_databases()
    except (TypeError, ValueError):
        databases = []  # TASKS_Q cannot be read: the checks run before handle() said so
    with starting(worker):
        command.check(tags=[STARTUP], databases=databases)


def check_start(app_configs: Any = None, databases: Sequence[str] | None = None,
                **kwargs: Any) -> list[checks.CheckMessage]:
    """E012/W003 migrations (on ``databases``), W004/W005 the worker, while one is started."""
    start = _starting.get()
    if start is None:
        return []
    try:
        ours = set(start_databases())
    except (TypeError, ValueError):
        return []  # E001, from check_settings
    found: list[checks.CheckMessage] = []
    for alias in sorted(set(databases or ()) & ours):
        found.extend(_check_migrations(alias))
    if start.worker is not None:
        found.extend(_check_sqlite(start.worker))
        found.extend(_check_visibility(start.worker))
    return found


def _check_migrations(alias: str) -> list[checks.CheckMessage]:
    """E012 when this app's migrations are not all applied on ``alias``."""
    from django.db import DatabaseError, connections
    from django.db.migrations.recorder import MigrationRecorder

    try:
        applied = {name for app, name in MigrationRecorder(connections[alias]).applied_migrations()
                   if app == APP_LABEL}
        if applied.issuperset(_migration_names()):
            return []  # the usual case, told without loading every app's migrations
        missing = _unapplied(alias)
    except DatabaseError as exc:
        return [checks.Warning(
            f"Could not check the migrations of django_tasks_q on database {alias!r} "
            f"({type(exc).__name__}: {str(exc).strip()}).",
            hint="Starting anyway: the process retries the database until it is reachable.",
            id="django_tasks_q.W003")]
    if not missing:
        return []
    option = "" if alias == "default" else f" --database={alias}"
    return [checks.Error(
        f"Database {alias!r} lacks {len(missing)} migration(s) of django_tasks_q "
        f"({', '.join(missing)}): its tables are missing or out of date.",
        hint=f"Run 'python manage.py migrate{option}', then start the process again.",
        id="django_tasks_q.E012")]


def _migration_names() -> list[str]:
    """The names of this app's migration modules, where Django's loader looks for them."""
    from django.db.migrations.loader import MigrationLoader

    module_name, _ = MigrationLoader.migrations_module(APP_LABEL)
    if module_name is None:  # MIGRATION_MODULES turns them off
        return []
    try:
        path = import_module(module_name).__path__
    except (ImportError, AttributeError):
        return []
    return [name for _, name, is_pkg in pkgutil.iter_modules(path)
            if not is_pkg and name[0] not in "_~"]


def _unapplied(alias: str) -> list[str]:
    """This app's migrations not applied on ``alias``, as ``migrate`` sees them (squashed
    migrations included): Django's loader reads every app's migrations to tell."""
    from django.db import connections
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(connections[alias], ignore_no_migrations=True)
    return sorted(name for app, name in loader.graph.nodes
                  if app == APP_LABEL and (app, name) not in loader.applied_migrations)


#: Seconds an SQLite writer must be allowed to wait for the lock before W004 is quiet.
SQLITE_WAIT = 10.0


def _check_sqlite(worker: WorkerOptions) -> list[checks.CheckMessage]:
    """W004: several processes or threads writing to an SQLite django:// broker at once."""
    from django.db import connections

    cfg = conf.get()
    if not str(cfg.BROKER_URL).startswith("django://") or worker.pool == "solo":
        return []
    alias = str(_broker_option(cfg, "database", "default"))
    if alias not in connections or connections[alias].vendor != "sqlite":
        return []
    options = connections[alias].settings_dict.get("OPTIONS") or {}
    if (str(options.get("transaction_mode", "")).upper() == "IMMEDIATE"
            and float(options.get("timeout", 5)) >= SQLITE_WAIT):
        return []  # writers queue for the lock instead of failing (docs/brokers.rst)
    if worker.autoscale is not None:
        running = f"--autoscale {worker.autoscale[0]},{worker.autoscale[1]} prefork children"
    elif worker.concurrency > 1:
        kind = "threads" if worker.pool == "threads" else "prefork children"
        running = f"{worker.concurrency} {kind}"
    else:
        return []
    return [checks.Warning(
        f"The django:// broker is on SQLite (database {alias!r}) and this worker runs "
        f"{running} at once, without IMMEDIATE transactions and a timeout of at least "
        f"{SQLITE_WAIT:g} seconds. SQLite lets one connection write at a time, so claims, "
        f"acknowledgements and result rows wait for each other, and a write that waits past "
        f"the database's timeout fails with 'database is locked'.",
        hint="Let writers wait rather than fail: OPTIONS {'transaction_mode': 'IMMEDIATE', "
             "'timeout': 20} in DATABASES, or run one task at a time (-P solo or -c 1). For "
             "more than one machine's work, put the database on PostgreSQL, or use Redis or "
             "RabbitMQ as BROKER_URL.", id="django_tasks_q.W004")]


def _check_visibility(worker: WorkerOptions) -> list[checks.CheckMessage]:
    """W005: a solo worker, which renews no lease while a task runs, and a long task."""
    from . import broker, registry

    cfg = conf.get()
    scheme = str(cfg.BROKER_URL).split("://", 1)[0]
    if worker.pool != "solo" or scheme not in ("redis", "rediss", "django"):
        return []
    default = (broker.REDIS_VISIBILITY_TIMEOUT if scheme != "django"
               else DJANGO_VISIBILITY_TIMEOUT)
    timeout = _broker_option(cfg, "visibility_timeout", default)
    hard = worker.time_limit or cfg.TIME_LIMIT
    soft = worker.soft_time_limit or cfg.SOFT_TIME_LIMIT
    runs = [(_run_bound(soft, hard), "a task without limits of its own")]
    for name in registry.names():
        task = registry.get(name)
        bound = _run_bound(task.soft_time_limit if task.soft_time_limit is not None else soft,
                           task.time_limit if task.time_limit is not None else hard)
        runs.append((bound, f"task {name!r}"))
    known = [(bound, who) for bound, who in runs if bound is not None]
    if not is_seconds(timeout) or not known:
        return []
    longest, who = max(known, key=lambda run: run[0])
    if longest <= timeout:
        return []
    return [checks.Warning(
        f"With -P solo the worker renews no lease while a task runs, and {who} may run "
        f"{longest:g}s, longer than the broker's visibility timeout ({timeout:g}s): its "
        f"message is then delivered again, to another worker, while it is still running.",
        hint=f"Set TASKS_Q['BROKER_OPTIONS']['visibility_timeout'] above {longest:g}, or use "
             f"-P threads or -P prefork, which keep the leases of running tasks.",
        id="django_tasks_q.W005")]


def _run_bound(soft: Any, hard: Any) -> float | None:
    # Solo enforces only the soft limit; a hard one still says how long the task may take.
    for value in (soft, hard):
        if is_seconds(value):
            return float(value)
    return None
