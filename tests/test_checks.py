"""System checks: settings, registered tasks, and what taskworker and taskbeat check at start."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage, run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, connections
from django.db.migrations.recorder import MigrationRecorder
from django.test import override_settings
from kombu.connection import Connection
from kombu.messaging import Producer

from django_tasks_q import AsyncResult, broker, checks, conf, registry, startchecks, task
from django_tasks_q.beat import Beat
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.main import Worker, WorkerOptions
from django_tasks_q.worker.pool import POOLS

from . import tasks
from .running import run_consumer

SQLITE = "checks_sqlite"  # a database alias added by the fixture below


def ids(messages: list[CheckMessage]) -> list[str]:
    return sorted(str(m.id) for m in messages)


def text(message: CheckMessage) -> str:
    return f"{message.msg} {message.hint or ''}"


@pytest.fixture
def no_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty task registry: only the tasks a test defines are checked."""
    monkeypatch.setattr(registry, "_tasks", {})


def define(name: str, **options: Any) -> None:
    def work() -> None: ...

    decorate: Any = task(name=name, **options)
    decorate(work)


def worker(pool: str = "prefork", concurrency: int = 4, **options: Any) -> WorkerOptions:
    return WorkerOptions(queues=["default"], concurrency=concurrency, pool=pool, **options)


@pytest.fixture
def sqlite_alias() -> Iterator[str]:
    """A second database alias on SQLite, in a directory that does not exist."""
    connections.settings[SQLITE] = connections.configure_settings(
        {"default": dict(connections.settings["default"]),
         SQLITE: {"ENGINE": "django.db.backends.sqlite3",
                  "NAME": "/nonexistent-dir/checks.sqlite3"}})[SQLITE]
    try:
        yield SQLITE
    finally:
        made: Any = connections._connections  # type: ignore[attr-defined]
        if hasattr(made, SQLITE):
            connections[SQLITE].close()
            delattr(made, SQLITE)
        del connections.settings[SQLITE]


# -- settings --------------------------------------------------------------------------------

def test_unknown_keys_suggest_the_closest_known_one() -> None:
    with override_settings(TASKS_Q={"BROKER_ULR": "redis://", "results": "all", "ZZZ": 1}):
        found = {str(m.msg).split("'")[1]: m for m in checks.check_settings()}
    assert {m.id for m in found.values()} == {"django_tasks_q.W001"}
    assert "Did you mean 'BROKER_URL'?" in (found["BROKER_ULR"].hint or "")
    assert "Did you mean 'RESULTS'?" in (found["results"].hint or "")
    assert "Did you mean" not in (found["ZZZ"].hint or "")


def test_a_scheme_we_cannot_use_is_named_without_the_password() -> None:
    with override_settings(TASKS_Q={"BROKER_URL": "kafka://user:s3cret@kafka:9092"}):
        [error] = checks.check_settings()
    assert error.id == "django_tasks_q.E003" and "'kafka'" in error.msg
    assert "s3cret" not in text(error) and "redis://" in text(error)
    with override_settings(TASKS_Q={"BROKER_URL": "postgres://app:s3cret@db/app"}):
        [error] = checks.check_settings()
    assert error.id == "django_tasks_q.E003" and "'django://'" in text(error)
    assert "s3cret" not in text(error)


@pytest.mark.parametrize("url", ["redis//:s3cret@localhost", "redis://:s3cret@localhost:63a9/0",
                                 "amqp://guest:s3cret@[::1/", None])
def test_a_malformed_broker_url_is_an_error_without_the_password(url: Any) -> None:
    with override_settings(TASKS_Q={"BROKER_URL": url}):
        [error] = checks.check_settings()
    assert error.id == "django_tasks_q.E007"
    assert "s3cret" not in text(error)


def test_a_good_broker_url_passes() -> None:
    for url in ("redis://:s3cret@127.0.0.1:6379/0", "rediss://h:6380/0", "django://",
                "amqp://guest:guest@127.0.0.1:5672//", "memory://"):
        with override_settings(TASKS_Q={"BROKER_URL": url}):
            assert checks.check_settings() == [], url


@pytest.mark.parametrize(("limits", "expected"), [
    ({"TIME_LIMIT": 60, "SOFT_TIME_LIMIT": 60}, ["django_tasks_q.E008"]),
    ({"TIME_LIMIT": 60, "SOFT_TIME_LIMIT": 90}, ["django_tasks_q.E008"]),
    ({"TIME_LIMIT": "60"}, ["django_tasks_q.E008"]),
    ({"TIME_LIMIT": 60, "SOFT_TIME_LIMIT": 50}, []),
    ({"SOFT_TIME_LIMIT": 50}, []),
])
def test_soft_time_limit_must_be_below_the_hard_one(limits: dict[str, Any],
                                                    expected: list[str]) -> None:
    with override_settings(TASKS_Q={"BROKER_URL": "memory://", **limits}):
        found = checks.check_settings()
    assert ids(found) == expected
    if expected and "SOFT_TIME_LIMIT" in limits:
        assert "SoftTimeLimitExceeded is never raised" in found[0].msg


def test_routes_to_undeclared_queues_are_errors() -> None:
    routes = {"reports.*": "reports", "mail.send": {"queue": "mail", "priority": 5},
              "mail.other": {"priority": 5}, "core.*": "default"}
    with override_settings(TASKS_Q={"QUEUES": ["default"], "ROUTES": routes}):
        found = checks.check_settings()
    assert ids(found) == ["django_tasks_q.E010"] * 2
    assert {m.msg.split(" sends")[0] for m in found} == {"TASKS_Q['ROUTES']['reports.*']",
                                                         "TASKS_Q['ROUTES']['mail.send']"}
    assert all("QUEUES'] (default)" in m.msg and "UnknownQueue" in m.msg for m in found)
    # Without an explicit QUEUES any queue may be sent to, as the client allows.
    with override_settings(TASKS_Q={"ROUTES": routes}):
        assert checks.check_settings() == []


# -- ACCEPT_CONTENT --------------------------------------------------------------------------

@pytest.mark.parametrize("accept", [["json", "pickle"], ("json", "application/x-python-serialize")])
def test_pickle_in_accepted_content_is_a_warning(accept: Any) -> None:
    with override_settings(TASKS_Q={"ACCEPT_CONTENT": accept}):
        [warning] = checks.check_settings()
    assert warning.id == "django_tasks_q.W002"
    assert "anyone who can publish to the broker can run code" in warning.msg


@pytest.mark.parametrize("accept", ["json", ["json", "bson"], ["json", "text/csv"], ["pickle"],
                                    [1]])
def test_accepted_content_workers_cannot_use_is_an_error(accept: Any) -> None:
    with override_settings(TASKS_Q={"ACCEPT_CONTENT": accept}):
        assert ids(checks.check_settings()) == ["django_tasks_q.E011"]


def test_accepted_content_defaults_to_json() -> None:
    with override_settings(TASKS_Q={}):
        assert conf.get().ACCEPT_CONTENT == ["json"]
        assert checks.check_settings() == []


@pytest.mark.django_db(transaction=True)
def test_workers_decode_what_accept_content_lists() -> None:
    payload = pickle.dumps(([6], {"y": 7}, {}), protocol=2)
    with Connection("memory://") as conn:
        queue = broker.queue("default")
        queue(conn.default_channel).purge()
        Producer(conn).publish(payload, exchange=queue.exchange, routing_key="default",
                               headers={"task": tasks.multiply.name, "id": "pickled"},
                               content_type="application/x-python-serialize",
                               content_encoding="binary", declare=[queue])
    with override_settings(TASKS_Q={"BROKER_URL": "memory://",
                                    "ACCEPT_CONTENT": ["json", "pickle"]}):
        consumer = Consumer(["default"], POOLS["solo"](1, "t", on_done=lambda j, o: None), "t",
                            prefetch=1)
        [(job, outcome)] = run_consumer(consumer, 1, timeout=15)
    assert (job.msg.id, outcome.status) == ("pickled", "SUCCESS")
    assert AsyncResult("pickled").get(timeout=1) == 42


# -- registered tasks ------------------------------------------------------------------------

@pytest.mark.usefixtures("no_tasks")
def test_a_task_whose_soft_limit_is_not_below_its_hard_limit_is_named() -> None:
    define(name="shop.tasks.export", time_limit=30, soft_time_limit=30)
    define(name="shop.tasks.report", soft_time_limit=120)  # over TASKS_Q's TIME_LIMIT
    define(name="shop.tasks.fine", time_limit=60, soft_time_limit=50)
    define(name="shop.tasks.plain")
    with override_settings(TASKS_Q={"TIME_LIMIT": 90}):
        found = checks.check_tasks()
    assert ids(found) == ["django_tasks_q.E009"] * 2
    export, report = sorted(found, key=lambda m: str(m.msg))
    assert "'shop.tasks.export'" in export.msg and "(30s)" in export.msg
    assert "'shop.tasks.report'" in report.msg and "TASKS_Q['TIME_LIMIT']" in report.msg
    with override_settings(TASKS_Q={}):
        assert ids(checks.check_tasks()) == ["django_tasks_q.E009"]
    with override_settings(TASKS_Q={"TIME_LIMIT": "90"}):  # E008's, not each task's
        assert ids(checks.check_tasks()) == ["django_tasks_q.E009"]
    define(name="shop.tasks.typo", time_limit="30")
    with override_settings(TASKS_Q={}):
        found = checks.check_tasks()
    assert ids(found) == ["django_tasks_q.E009"] * 2
    assert "Task 'shop.tasks.typo': its time_limit is '30'." in {m.msg for m in found}


@pytest.mark.usefixtures("no_tasks")
def test_a_task_sent_to_an_undeclared_queue_is_named() -> None:
    define(name="shop.tasks.export", queue="exports")
    define(name="shop.tasks.mail", queue="mail")  # routed elsewhere: its own queue is unused
    define(name="shop.tasks.fast", queue="high")
    with override_settings(TASKS_Q={"QUEUES": ["default", "high"],
                                    "ROUTES": {"shop.tasks.m*": {"queue": "default"}}}):
        [error] = checks.check_tasks()
    assert error.id == "django_tasks_q.E010"
    assert "'shop.tasks.export'" in error.msg and "'exports'" in error.msg
    with override_settings(TASKS_Q={}):
        assert checks.check_tasks() == []


# -- start-up: migrations --------------------------------------------------------------------

@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What would have run: taskworker's and taskbeat's loops, replaced by a note."""
    ran: list[str] = []

    def worker_run(self: Worker) -> int:
        ran.append("worker")
        return 0

    def beat_run(self: Beat) -> None:
        ran.append("beat")

    monkeypatch.setattr(Worker, "run", worker_run)
    monkeypatch.setattr(Beat, "run", beat_run)
    return ran


@pytest.mark.django_db
@pytest.mark.parametrize("command", ["taskworker", "taskbeat"])
def test_start_is_refused_while_migrations_are_missing(command: str, started: list[str]) -> None:
    args = ["-P", "solo"] if command == "taskworker" else []
    call_command(command, *args, skip_checks=False)
    assert started == [command.removeprefix("task")]

    MigrationRecorder(connection).record_unapplied("django_tasks_q", "0005_queue_binding")
    with pytest.raises(SystemCheckError) as refused:
        call_command(command, *args, skip_checks=False)
    assert "django_tasks_q.E012" in str(refused.value)
    assert "0005_queue_binding" in str(refused.value)
    assert "manage.py migrate" in str(refused.value)
    assert started == [command.removeprefix("task")]


@pytest.mark.django_db
def test_migrate_and_check_are_not_stopped_by_missing_migrations() -> None:
    MigrationRecorder(connection).record_unapplied("django_tasks_q", "0005_queue_binding")
    # migrate runs the checks with databases too; it must be able to apply what is missing.
    assert startchecks.check_start(databases=["default"]) == []
    with startchecks.starting(None):
        assert ids(startchecks.check_start(databases=["default"])) == ["django_tasks_q.E012"]


@pytest.mark.django_db
def test_applied_migrations_are_told_without_loading_every_apps_migrations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("MigrationLoader built")

    monkeypatch.setattr("django.db.migrations.loader.MigrationLoader.__init__", refuse)
    with startchecks.starting(None):
        assert startchecks.check_start(databases=["default"]) == []


@pytest.mark.django_db
def test_no_migration_is_missing_when_migration_modules_turns_them_off() -> None:
    MigrationRecorder(connection).record_unapplied("django_tasks_q", "0005_queue_binding")
    with override_settings(MIGRATION_MODULES={"django_tasks_q": None}), \
            startchecks.starting(None):
        assert startchecks.check_start(databases=["default"]) == []


def test_an_unreachable_database_is_a_warning_not_a_refusal(
        sqlite_alias: str, django_db_blocker: Any) -> None:
    with override_settings(TASKS_Q={"BROKER_URL": "django://",
                                    "BROKER_OPTIONS": {"database": sqlite_alias}}), \
            startchecks.starting(None), django_db_blocker.unblock():
        found = startchecks.check_start(databases=[sqlite_alias])
    assert ids(found) == ["django_tasks_q.W003"]
    assert f"'{sqlite_alias}'" in found[0].msg and "OperationalError" in found[0].msg


# -- start-up: the worker's pool -------------------------------------------------------------

@pytest.mark.parametrize(("options", "warned"), [
    (worker("prefork", 4), True),
    (worker("threads", 8), True),
    (worker("prefork", 1, autoscale=(4, 1)), True),
    (worker("prefork", 1), False),
    (worker("threads", 1), False),
    (worker("solo", 4), False),
])
def test_django_broker_on_sqlite_with_several_writers_is_a_warning(
        sqlite_alias: str, options: WorkerOptions, warned: bool) -> None:
    with override_settings(TASKS_Q={"BROKER_URL": "django://",
                                    "BROKER_OPTIONS": {"database": sqlite_alias}}), \
            startchecks.starting(options):
        found = startchecks.check_start()
    assert ids(found) == (["django_tasks_q.W004"] if warned else [])
    if warned:
        assert "database is locked" in found[0].msg and "PostgreSQL" in (found[0].hint or "")
    with override_settings(TASKS_Q={"BROKER_URL": "redis://127.0.0.1:6379/0",
                                    "BROKER_OPTIONS": {"database": sqlite_alias}}), \
            startchecks.starting(options):
        assert startchecks.check_start() == []


@pytest.mark.parametrize(("db_options", "warned"), [
    ({"transaction_mode": "IMMEDIATE", "timeout": 20}, False),
    ({"transaction_mode": "immediate", "timeout": 10}, False),
    ({"transaction_mode": "IMMEDIATE"}, True),  # SQLite's default wait, 5 s, is too short
    ({"transaction_mode": "DEFERRED", "timeout": 20}, True),
])
def test_sqlite_set_to_let_writers_wait_is_no_warning(
        sqlite_alias: str, db_options: dict[str, Any], warned: bool) -> None:
    connections[sqlite_alias].settings_dict["OPTIONS"] = db_options
    with override_settings(TASKS_Q={"BROKER_URL": "django://",
                                    "BROKER_OPTIONS": {"database": sqlite_alias}}), \
            startchecks.starting(worker("prefork", 4)):
        found = startchecks.check_start()
    assert ids(found) == (["django_tasks_q.W004"] if warned else [])


@pytest.mark.usefixtures("no_tasks")
def test_a_solo_worker_warns_of_tasks_longer_than_the_visibility_timeout() -> None:
    define(name="shop.tasks.export", time_limit=900, soft_time_limit=400)
    define(name="shop.tasks.quick", time_limit=10)
    redis = {"BROKER_URL": "redis://127.0.0.1:6379/0"}
    with override_settings(TASKS_Q=redis), startchecks.starting(worker("solo")):
        [warning] = startchecks.check_start()
    assert warning.id == "django_tasks_q.W005"
    assert "'shop.tasks.export' may run 400s" in warning.msg and "(300s)" in warning.msg
    assert "delivered again" in warning.msg and "visibility_timeout" in (warning.hint or "")

    with override_settings(TASKS_Q={**redis, "BROKER_OPTIONS": {"visibility_timeout": 600}}), \
            startchecks.starting(worker("solo")):
        assert startchecks.check_start() == []
    with override_settings(TASKS_Q={"BROKER_URL": "django://", "TIME_LIMIT": 90}), \
            startchecks.starting(worker("solo", time_limit=None)):
        assert ids(startchecks.check_start()) == ["django_tasks_q.W005"]  # 60s leases there
    for options in (worker("prefork"), worker("threads")):  # they keep the leases
        with override_settings(TASKS_Q=redis), startchecks.starting(options):
            assert startchecks.check_start() == []
    with override_settings(TASKS_Q={"BROKER_URL": "amqp://127.0.0.1//"}), \
            startchecks.starting(worker("solo")):
        assert startchecks.check_start() == []


# -- projects that do not configure anything -------------------------------------------------

def test_a_project_without_tasks_q_checks_clean_without_touching_the_database() -> None:
    # No django_db mark: any database access in here fails the test.
    with override_settings():
        del settings.TASKS_Q
        conf.get.cache_clear()
        try:
            found = [m for m in run_checks() if str(m.id).startswith("django_tasks_q.")]
            call_command("check")
            with startchecks.starting(worker("solo")):
                found += startchecks.check_start()  # no databases asked for: no migrations look
        finally:
            conf.get.cache_clear()
    assert found == []


@pytest.mark.django_db
def test_the_models_and_their_migrations_agree() -> None:
    # Exits (SystemExit 1) when a model change has no migration.
    call_command("makemigrations", "django_tasks_q", "--check", "--dry-run", verbosity=0)
