"""Settings are read at call time, reset on change, and checked."""

from __future__ import annotations

from datetime import timedelta

from django.test import override_settings

from django_tasks_q import checks, conf


def test_defaults() -> None:
    with override_settings(TASKS_Q={}):
        cfg = conf.get()
        assert cfg.BROKER_URL == "django://" and cfg.RESULTS == "errors"
        assert cfg.QUEUES == ["default"] and cfg.ACKS_LATE and cfg.ENQUEUE_ON_COMMIT
        assert timedelta(days=7) == cfg.RESULT_EXPIRES and cfg.TIMEZONE == "UTC"


def test_changes_apply_without_restart() -> None:
    with override_settings(TASKS_Q={"RESULTS": "all", "RESULT_EXPIRES": 60}):
        assert conf.get().RESULTS == "all"
        assert timedelta(seconds=60) == conf.get().RESULT_EXPIRES
    assert conf.get().RESULTS == "errors"


def test_unknown_key_is_a_warning() -> None:
    with override_settings(TASKS_Q={"BROKER_URL": "memory://", "RESULT": "all"}):
        [warning] = checks.check_settings()
    assert warning.id == "django_tasks_q.W001" and "'RESULT'" in warning.msg
    assert "RESULTS" in (warning.hint or "")


def test_bad_values_are_errors() -> None:
    with override_settings(TASKS_Q={"RESULTS": "some", "BROKER_URL": "kafka://x",
                                    "QUEUES": ["a"]}):
        ids = sorted(m.id for m in checks.check_settings())
    assert ids == ["django_tasks_q.E002", "django_tasks_q.E003", "django_tasks_q.E004"]


def test_queues_default_to_the_default_queue() -> None:
    with override_settings(TASKS_Q={"DEFAULT_QUEUE": "main"}):
        assert conf.get().QUEUES == ["main"]


def test_a_beat_schedule_entry_that_is_not_a_schedule_is_an_error() -> None:
    good = {"task": "tests.tasks.multiply", "schedule": "*/5 * * * *"}
    with override_settings(TASKS_Q={"BEAT_SCHEDULE": {"ok": good, "bad": {
            "task": "tests.tasks.multiply", "schedule": "every day"}}}):
        [error] = checks.check_settings()
    assert error.id == "django_tasks_q.E006"
    assert """TASKS_Q["BEAT_SCHEDULE"]['bad']["schedule"]""" in error.msg
    assert "2 field(s)" in error.msg
    with override_settings(TASKS_Q={"BEAT_SCHEDULE": ["not", "a", "dict"]}):
        assert [m.id for m in checks.check_settings()] == ["django_tasks_q.E006"]
