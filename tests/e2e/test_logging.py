"""End-to-end: a worker logs through the project's ``LOGGING``, at the levels it sets."""

from __future__ import annotations

import re

import pytest

from .conftest import Project

pytestmark = pytest.mark.e2e

TASKS = "testproject.testapp.tasks"


@pytest.mark.parametrize("project", ["django-sqlite"], indirect=True)
def test_the_projects_logging_settings_are_kept(project: Project) -> None:
    """Its handler and format are used, its levels win over ``-l DEBUG``, and records logged
    inside a task carry the task's name and id (``TaskFilter``)."""
    project.extra_env["DJANGO_SETTINGS_MODULE"] = "tests.e2e.logging_settings"
    worker = project.worker("-l", "DEBUG", pool="solo", concurrency=1)
    added = project.send(f"{TASKS}.add", 2, 3)
    declined = project.send(f"{TASKS}.charge_payment",
                            project.create_order("eve@declined.example"))
    # Its retry would be logged at INFO by django_tasks_q.execute, which LOGGING keeps at WARNING.
    retried = project.send_message(f"{TASKS}.sync_to_warehouse",
                                   [project.create_order("frank@example.com")], retries=1)

    project.wait_results([added, declined, retried])
    worker.wait_log(rf"add\[{added}\] succeeded")

    log = worker.log
    assert re.search(rf"^PROJECT INFO django_tasks_q\.worker \?\?\?\[\?\?\?\] Task {TASKS}\.add"
                     rf"\[{added}\] succeeded in \d+\.\d+s: 5$", log, re.MULTILINE), log
    charge = re.escape(f"{TASKS}.charge_payment[{declined}]")
    assert re.search(rf"^PROJECT ERROR django_tasks_q\.execute {charge} Task {charge} failed: "
                     rf"PaymentDeclined", log, re.MULTILINE), log
    assert re.search(r"^PROJECT INFO django_tasks_q\.worker .* ready: pool=solo", log,
                     re.MULTILINE), log
    assert f"sync_to_warehouse[{retried}] retry" not in log
    assert " DEBUG " not in log
    # No handler of ours beside the project's: every line is in the project's format.
    assert [line for line in log.splitlines() if not line.startswith("PROJECT ")] == []
