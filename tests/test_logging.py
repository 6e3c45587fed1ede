"""Logging: worker lines name the task, task code's records carry it, LOGGING is respected."""

from __future__ import annotations

import contextlib
import io
import logging
import logging.config
import logging.handlers
import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import CommandError
from django.test import override_settings
from kombu.connection import Connection

from django_tasks_q import broker, log, task
from django_tasks_q.management import configure_logging
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.pool import POOLS

from . import tasks
from .running import run_consumer

SHOP = "tests.shop"  # stands for a project's own logger
task_records: list[logging.LogRecord] = []


class Keep(logging.Handler):
    """Keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@task
def says(text: str) -> str:
    """Logs ``text`` from inside a task, as project code does."""
    logging.getLogger(SHOP).warning("%s", text)
    log.get_task_logger(f"{SHOP}.tasklog").warning("%s via get_task_logger", text)
    return text


def bare(root: logging.Logger) -> logging.Logger:
    """``root`` without handlers: pytest adds its own once the test starts."""
    for handler in list(root.handlers):
        root.removeHandler(handler)
    return root


@pytest.fixture
def pristine_logging() -> Iterator[logging.Logger]:
    """The root logger at its default level and ours unset; every logger restored after."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger(), *(found for found in manager.loggerDict.values()
                                      if isinstance(found, logging.Logger))]
    saved = [(one, one.level, list(one.handlers), list(one.filters), one.propagate,
              one.disabled) for one in loggers]
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    logging.getLogger("django_tasks_q").setLevel(logging.NOTSET)
    try:
        yield root
    finally:
        for one, level, handlers, filters, propagate, disabled in saved:
            one.setLevel(level)
            one.handlers[:] = handlers
            one.filters[:] = filters
            one.propagate, one.disabled = propagate, disabled
        for name in list(manager.loggerDict):
            if name.startswith(SHOP):  # made by a test: gone with it
                del manager.loggerDict[name]


@contextlib.contextmanager
def project_logging(config: dict[str, Any]) -> Iterator[None]:
    """``config`` as the project's ``LOGGING``, applied as Django applies it at start-up."""
    full = {"version": 1, "disable_existing_loggers": False, **config}
    with override_settings(LOGGING=full):  # from Django 6.1 on, this applies it too
        logging.config.dictConfig(full)
        yield


# -- -l/--loglevel and the project's LOGGING -------------------------------------------------

def test_without_logging_settings_logs_to_stderr_at_the_level_given(
        pristine_logging: logging.Logger) -> None:
    bare(pristine_logging)
    configure_logging("debug")
    [handler] = pristine_logging.handlers
    assert type(handler) is logging.StreamHandler and isinstance(handler.formatter,
                                                                log.TaskFormatter)
    assert pristine_logging.level == logging.DEBUG
    assert logging.getLogger("django_tasks_q").level == logging.DEBUG
    configure_logging("INFO")  # once more (taskworker -B): nothing is added twice
    assert pristine_logging.handlers == [handler]


def test_levels_and_handlers_from_logging_settings_are_kept(
        pristine_logging: logging.Logger) -> None:
    with project_logging({
        "handlers": {"project": {"class": "logging.handlers.BufferingHandler", "capacity": 100}},
        "root": {"handlers": ["project"], "level": "ERROR"},
        "loggers": {"django_tasks_q": {"level": "WARNING"}},
    }):
        [project] = pristine_logging.handlers
        configure_logging("DEBUG")
        assert pristine_logging.handlers == [project]  # none of ours beside the project's
        assert pristine_logging.level == logging.ERROR
        assert logging.getLogger("django_tasks_q").level == logging.WARNING
        logging.getLogger("django_tasks_q.worker").info("not at INFO")
        logging.getLogger("django_tasks_q.worker").warning("worker line")
        assert isinstance(project, logging.handlers.BufferingHandler)
        assert [r.getMessage() for r in project.buffer] == ["worker line"]


def test_the_level_given_fills_in_only_what_logging_settings_left_unset(
        pristine_logging: logging.Logger) -> None:
    # A root level but no handler: ours is added, the level stays; our logger had none.
    bare(pristine_logging)
    with project_logging({"root": {"level": "ERROR"}, "loggers": {SHOP: {"level": "DEBUG"}}}):
        configure_logging("INFO")
        [handler] = pristine_logging.handlers
        assert isinstance(handler.formatter, log.TaskFormatter)
        assert pristine_logging.level == logging.ERROR
        assert logging.getLogger(SHOP).level == logging.DEBUG
        assert logging.getLogger("django_tasks_q").level == logging.INFO


def test_an_unknown_level_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="Unknown log level 'LOUD'; use DEBUG, INFO"):
        configure_logging("LOUD")


# -- records from inside a task ----------------------------------------------------------------

@pytest.fixture
def _empty_queue() -> None:
    with Connection("memory://") as conn:
        broker.queue("default")(conn.default_channel).purge()


def run_worker(pool: str, expected: int) -> None:
    consumer = Consumer(["default"], POOLS[pool](2, "t", on_done=lambda j, o: None), "t",
                        prefetch=4)
    assert len(run_consumer(consumer, expected, timeout=15)) == expected


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_empty_queue")
def test_task_filter_names_the_task_each_record_was_logged_in(
        pristine_logging: logging.Logger) -> None:
    keep = Keep()
    keep.addFilter(log.TaskFilter())
    shop = logging.getLogger(SHOP)
    shop.addHandler(keep)
    shop.setLevel(logging.INFO)
    shop.info("outside any task")
    sent = {text: says.delay(text).id for text in ("one", "two", "three")}

    run_worker("threads", 3)  # two threads: tasks run side by side

    by_text = {r.getMessage(): (getattr(r, "task_name", None), getattr(r, "task_id", None))
               for r in keep.records}
    assert by_text.pop("outside any task") == (log.NO_TASK, log.NO_TASK)
    assert by_text == {text: (says.name, task_id) for text, task_id in sent.items()} | {
        f"{text} via get_task_logger": (says.name, task_id) for text, task_id in sent.items()}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_empty_queue")
def test_get_task_logger_records_carry_the_task_to_any_handler(
        pristine_logging: logging.Logger) -> None:
    keep = Keep()  # no filter of its own
    logging.getLogger(SHOP).addHandler(keep)
    sent = says.delay("hello")
    task_logger = log.get_task_logger(f"{SHOP}.tasklog")
    task_logger.warning("not in a task")
    assert log.get_task_logger(f"{SHOP}.tasklog") is task_logger
    assert [type(f) for f in task_logger.filters] == [log.TaskFilter]  # once, however often

    run_worker("solo", 1)

    carried = [(r.getMessage(), getattr(r, "task_id", None)) for r in keep.records]
    assert carried == [("not in a task", log.NO_TASK), ("hello", None),
                       ("hello via get_task_logger", sent.id)]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_empty_queue")
def test_the_default_handler_prefixes_task_code_lines_with_name_and_id(
        pristine_logging: logging.Logger) -> None:
    bare(pristine_logging)
    configure_logging("INFO")
    [handler] = pristine_logging.handlers
    assert isinstance(handler, logging.StreamHandler)
    out = io.StringIO()
    handler.setStream(out)
    sent = says.delay("charging")
    failed = tasks.boom.delay("declined")

    run_worker("solo", 2)

    lines = out.getvalue().splitlines()
    stamp = r"\[\d{4}-\d\d-\d\d [\d:,]+: (INFO|WARNING|ERROR)/MainProcess\] "
    name = re.escape(says.name)
    assert any(re.fullmatch(stamp + rf"{name}\[{sent.id}\]: charging", line) for line in lines)
    # The worker's own lines name the task themselves, so they are not prefixed.
    assert any(re.fullmatch(stamp + rf"Task {name}\[{sent.id}\] succeeded in \d+\.\d{{3}}s: "
                            r"'charging'", line) for line in lines), lines
    assert any(re.fullmatch(stamp + rf"Task tests\.tasks\.boom\[{failed.id}\] failed: "
                            r"ValueError: declined", line) for line in lines), lines


# -- the worker's own lines -------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_empty_queue")
def test_worker_lines_about_a_task_carry_its_name_and_id(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "django_tasks_q")
    ok, bad = tasks.multiply.delay(6, 7), tasks.boom.delay("x")
    retried = tasks.retries_then_ok.delay(1)
    revoked = tasks.multiply.delay(1, 1)
    revoked.revoke()

    run_worker("solo", 4)  # multiply, boom, retries_then_ok and its retry

    lines = [r.getMessage() for r in caplog.records if r.name.startswith("django_tasks_q")]
    assert re.search(rf"Task tests\.tasks\.multiply\[{ok.id}\] succeeded in \d+\.\d+s: 42",
                     "\n".join(lines))
    assert f"Task tests.tasks.boom[{bad.id}] failed: ValueError: x" in lines
    assert any(line.startswith(f"Task tests.tasks.retries_then_ok[{retried.id}] retry 1 in ")
               for line in lines)
    assert f"Task tests.tasks.multiply[{revoked.id}] was revoked; not run" in lines
