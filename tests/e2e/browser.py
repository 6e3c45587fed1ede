"""A headless Chromium (Debian's packages) for the admin's browser checks, and screenshots."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import in_ci

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1600, 1100)  # pixels; the docs' pictures are taken at this size unless a test resizes


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium driven by selenium; skipped locally, failing under CI, without it."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = ("Chromium is not installed: apt-get install chromium chromium-driver "
                   "to run this test")
        if in_ci():
            pytest.fail(message + " (CI=true: a missing browser is a failure)")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size={},{}".format(*WINDOW)):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(browser: Any, name: str) -> None:
    """With SCREENSHOTS_DIR set, keep what the browser shows (the docs' pictures come from it)."""
    folder = os.environ.get("SCREENSHOTS_DIR")
    if folder:
        browser.save_screenshot(str(Path(folder) / name))


def log_in(browser: Any, project: Any, timeout: float = 10) -> tuple[str, Any]:
    """Start the project's web server, make a superuser and log the browser in as it; the
    server's base URL and a ``WebDriverWait`` of ``timeout`` seconds."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    project.producer.call("create_superuser", username="root", password="pw")
    base = project.server().url
    browser.get(f"{base}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys("root")
    browser.find_element(By.NAME, "password").send_keys("pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait = WebDriverWait(browser, timeout)
    wait.until(lambda _: "/admin/login/" not in browser.current_url)  # logged in
    return base, wait
