"""The periodic task form in a real headless browser (Debian's Chromium) against the example
project's real web server: fields follow the schedule type, the next runs appear as a crontab is
typed, and the form saves."""

from __future__ import annotations

from typing import Any

import pytest

from .browser import browser, log_in, screenshot  # noqa: F401 - the browser fixture
from .conftest import Project

pytestmark = pytest.mark.e2e



@pytest.mark.parametrize("project", ["django-sqlite"], indirect=True)
def test_the_add_form_follows_the_schedule_type_previews_runs_and_saves(
        browser: Any, project: Project) -> None:  # noqa: F811 - the imported fixture
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    base, wait = log_in(browser, project)
    browser.get(f"{base}/admin/django_tasks_q/periodictask/add/")

    def row(name: str) -> Any:
        return browser.find_element(By.CSS_SELECTOR, f".field-{name}")

    # Crontab is the default type: only its field shows.
    wait.until(lambda _: not row("interval").is_displayed())
    assert row("crontab").is_displayed() and not row("run_at").is_displayed()

    browser.find_element(By.NAME, "name").send_keys("weekday-report")
    Select(browser.find_element(By.NAME, "task")).select_by_value("testproject.testapp.tasks.add")
    Select(browser.find_element(By.NAME, "timezone")).select_by_value("Europe/Berlin")
    browser.find_element(By.NAME, "crontab").send_keys("30 2 * * 1-5")
    preview = browser.find_element(By.ID, "dtq-preview")
    wait.until(lambda _: "Monday through Friday" in preview.text)
    lines = preview.text.splitlines()
    assert lines[0] == "At 02:30, Monday through Friday (Europe/Berlin)"
    assert len(lines) == 6 and all("02:30:00 CE" in line for line in lines[1:]), lines
    screenshot(browser, "periodic-task-form.png")

    # Another type shows its own field instead, and the preview follows it.
    browser.find_element(By.CSS_SELECTOR, 'input[name="kind"][value="interval"]').click()
    wait.until(lambda _: row("interval").is_displayed())
    assert not row("crontab").is_displayed()
    browser.find_element(By.NAME, "interval").send_keys("00:10:00")
    wait.until(lambda _: preview.text.startswith("Every 10 minutes"))
    browser.find_element(By.CSS_SELECTOR, 'input[name="kind"][value="crontab"]').click()
    wait.until(lambda _: "Monday through Friday" in preview.text)

    args = browser.find_element(By.NAME, "args")
    args.clear()
    args.send_keys("[6, 7]")
    browser.find_element(By.NAME, "_save").click()
    wait.until(lambda _: "was added successfully" in browser.page_source)
    saved = project.producer.call("periodic_task", name="weekday-report")
    assert (saved["crontab"], saved["interval"], saved["args"]) == ("30 2 * * 1-5", None, [6, 7])
    screenshot(browser, "periodic-task-list.png")
