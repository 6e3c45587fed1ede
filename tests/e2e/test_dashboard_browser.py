"""The dashboard in a real headless browser (Debian's Chromium) against the example project's real
web server and worker: reached from the admin's index, it draws the chart, lists the running
worker as online, and refreshes itself without a reload."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from django_tasks_q import monitor

from .browser import browser, log_in, screenshot  # noqa: F401 - the browser fixture
from .conftest import PYTHON, REPO, Project

pytestmark = pytest.mark.e2e

TASKS = "testproject.testapp.tasks"
# An hour's history of a worker that has stopped since: minutes ago -> (processed, failed).
HISTORY = {ago: (12 + (ago * 7) % 23, (ago * 5) % 7 // 4) for ago in range(22, 56)}
PREVIOUS = "w0.previous@e2e"


def seed_history(project: Project) -> dict[str, tuple[int, int]]:
    """Rows a stopped worker left: its state and HISTORY's counts; the counts by minute (ISO)."""
    now = timezone.now()
    current = monitor.minute_start(now)
    minutes = {(current - timedelta(minutes=ago)).isoformat(): counts
               for ago, counts in HISTORY.items()}
    stopped = (now - timedelta(minutes=20)).isoformat()
    script = (
        "import datetime\n"
        "from django_tasks_q.models import TaskCount, WorkerState\n"
        f"stopped = datetime.datetime.fromisoformat({stopped!r})\n"
        f"WorkerState.objects.create(hostname={PREVIOUS!r}, pid=4242, pool='prefork', "
        "concurrency=8, queues=['default'], processed=1200, failed=31, "
        "started_at=stopped - datetime.timedelta(hours=6), last_heartbeat=stopped, "
        "stopped_at=stopped)\n"
        f"TaskCount.objects.bulk_create(TaskCount(worker={PREVIOUS!r}, "
        "minute=datetime.datetime.fromisoformat(minute), processed=p, failed=f) "
        f"for minute, (p, f) in {minutes!r}.items())\n")
    subprocess.run([PYTHON, "manage.py", "shell", "-c", script], cwd=REPO, env=project.env,
                   check=True, capture_output=True, timeout=60)
    return minutes


@pytest.mark.parametrize("project", ["django-sqlite"], indirect=True)
def test_the_dashboard_draws_the_chart_lists_the_worker_and_refreshes(
        browser: Any, project: Project) -> None:  # noqa: F811 - the imported fixture
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    browser.set_window_size(1400, 1150)  # the docs' picture
    history = seed_history(project)
    worker = project.worker(concurrency=4)
    base, wait = log_in(browser, project)
    # Reached from the admin's index.
    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    wait.until(lambda _: browser.current_url.endswith("/admin/django_tasks_q/dashboard/"))

    def cell(hostname: str, name: str) -> str:
        return str(browser.find_element(
            By.CSS_SELECTOR, f'tr[data-hostname="{hostname}"] td.dtq-{name}').text)

    # The chart: one bar for each minute with tasks, each saying what it counts.
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#dtq-chart svg"))
    bars = {bar.get_attribute("data-minute"): bar
            for bar in browser.find_elements(By.CSS_SELECTOR, "#dtq-chart g.dtq-minute")}
    assert set(bars) == set(history)
    for minute, (processed, failed) in history.items():
        title = bars[minute].find_element(By.TAG_NAME, "title").get_attribute("textContent")
        assert title.endswith(f": {processed} processed, {failed} failed"), title
        rect = bars[minute].find_element(By.CSS_SELECTOR, "rect.dtq-bar-processed")
        assert float(rect.get_attribute("height")) > 0
    assert len(browser.find_elements(By.CSS_SELECTOR, "#dtq-chart rect.dtq-bar-failed")) == sum(
        1 for _, failed in history.values() if failed)

    # The running worker is online, the one that stopped is not.
    assert (cell(worker.hostname, "status"), cell(worker.hostname, "pid"),
            cell(worker.hostname, "concurrency"), cell(worker.hostname, "processed")) == (
        "online", str(worker.pid), "4", "0")
    assert cell(PREVIOUS, "status") == "offline"

    # Tasks run: the page follows without being reloaded.
    browser.execute_script("window.dtqNotReloaded = true;")
    declined = project.create_order("mallory@declined.example")
    ids = [project.send(f"{TASKS}.add", i, i) for i in range(7)]
    ids.append(project.send(f"{TASKS}.charge_payment", declined))
    project.wait_results(ids)
    refreshed = WebDriverWait(browser, 2 * monitor.HEARTBEAT_INTERVAL + 10)
    refreshed.until(lambda _: cell(worker.hostname, "processed") == "8")
    assert cell(worker.hostname, "failed") == "1"
    assert browser.execute_script("return window.dtqNotReloaded === true;")
    # …and the chart has a bar for the minutes they ran in.
    refreshed.until(lambda _: len(browser.find_elements(
        By.CSS_SELECTOR, "#dtq-chart g.dtq-minute")) > len(history))
    assert not browser.find_element(By.ID, "dtq-refresh-error").is_displayed()
    processed = sum(p for p, _ in history.values()) + 8
    failed = sum(f for _, f in history.values()) + 1
    assert browser.find_element(By.ID, "dtq-totals").text == (
        f"{processed} processed, {failed} failed")
    screenshot(browser, "dashboard.png")
