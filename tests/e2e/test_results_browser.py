"""Failure triage in a real headless browser (Debian's Chromium) against the example project's
real web server and a real worker: a failed task is listed, its detail page shows the
traceback, and both the list's Retry action and the detail page's Retry button send it again,
so the worker runs it again."""

from __future__ import annotations

import re
from typing import Any

import pytest

from .browser import browser, log_in, screenshot  # noqa: F401 - the browser fixture
from .conftest import Project

pytestmark = pytest.mark.e2e

TASKS = "testproject.testapp.tasks"
LIST = "/admin/django_tasks_q/taskresult/"
NEW_ID = re.compile(r"the new task id is ([0-9a-f-]{36})\.")


@pytest.mark.parametrize("project", ["django-sqlite"], indirect=True)
def test_a_failure_is_listed_shown_with_its_traceback_and_retried(
        browser: Any, project: Project) -> None:  # noqa: F811 - the imported fixture
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    project.worker(concurrency=1)
    declined = project.create_order("ann@declined.example")
    failed = project.send(f"{TASKS}.charge_payment", declined)
    others = [project.send(f"{TASKS}.charge_payment", project.create_order("bo@declined.example")),
              project.send(f"{TASKS}.add", 2, 3), project.send("shop.tasks.retired_task", 1)]
    rows = project.wait_results([failed, *others])
    assert rows[failed]["status"] == "FAILURE", rows[failed]

    base, wait = log_in(browser, project, timeout=15)

    # The list: the failure's row, newest first among the others.
    browser.get(f"{base}{LIST}")
    link = wait.until(lambda _: browser.find_element(By.LINK_TEXT, failed))
    cells = link.find_element(By.XPATH, "./ancestor::tr").text
    assert "charge_payment" in cells and "FAILURE" in cells.upper() and project.queue in cells
    screenshot(browser, "taskresult-list.png")

    # The detail page: the exception, and the traceback as it was printed.
    link.click()
    traceback = wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, "pre.dtq-traceback"))
    assert traceback.text.startswith("Traceback (most recent call last):")
    assert f"PaymentDeclined: card declined for order {declined}" in traceback.text
    assert traceback.value_of_css_property("white-space") == "pre"
    exception = browser.find_element(By.CSS_SELECTOR, ".field-exception .readonly").text
    assert exception == (f"PaymentDeclined: card declined for order {declined} "
                         "(ann@declined.example)")
    screenshot(browser, "taskresult-detail.png")

    # The detail page's Retry button: a new task, which the worker runs (and which fails again).
    browser.find_element(By.ID, "dtq-retry").click()
    again = _new_id(browser, wait)
    assert again != failed
    rerun = project.wait_results([again])[again]
    assert (rerun["task_name"], rerun["args"], rerun["queue"], rerun["status"]) == (
        f"{TASKS}.charge_payment", [declined], project.queue, "FAILURE")

    # The list's Retry action, on the original row.
    browser.get(f"{base}{LIST}?q={failed}")
    wait.until(lambda _: browser.find_element(By.LINK_TEXT, failed))
    browser.find_element(By.CSS_SELECTOR, "input[name=_selected_action]").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("retry")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    third = _new_id(browser, wait)
    assert third not in (failed, again)
    assert project.wait_results([third])[third]["args"] == [declined]


def _new_id(driver: Any, wait: Any) -> str:
    """The new task id the admin's success message names."""
    from selenium.webdriver.common.by import By

    def found() -> str | None:
        for note in driver.find_elements(By.CSS_SELECTOR, ".messagelist .success"):
            match = NEW_ID.search(note.text)
            if match:
                return match[1]
        return None

    new_id: str = wait.until(lambda _: found())
    return new_id
