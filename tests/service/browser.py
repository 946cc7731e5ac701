"""Headless Chromium for the browser tests (and scripts/screenshot_ui.py): Debian's
``chromium`` driven by its ``chromium-driver`` through selenium. Playwright cannot download
its own browsers here; ``.ci/run`` installs both packages where they are missing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def missing() -> str | None:
    """What is missing to drive a browser, in words; None when nothing is."""
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if shutil.which(path) is None and shutil.which(name) is None:
            return f"{name} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium WebDriver whose console messages ``console_errors`` can read."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # Chromium leaves its profile and a singleton-socket folder in the temp folder: both go
    # into one of our own, removed after it quits.
    scratch = tempfile.TemporaryDirectory(prefix="normcore-chromium-")
    options = Options()
    options.binary_location = shutil.which(CHROMIUM) or shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
                     f"--window-size={width},{height}",
                     f"--user-data-dir={Path(scratch.name) / 'profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(shutil.which(CHROMEDRIVER) or shutil.which("chromedriver"),
                      env={**os.environ, "TMPDIR": scratch.name})
    try:
        driver = webdriver.Chrome(options=options, service=service)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        scratch.cleanup()


def console_errors(driver: Any) -> list[str]:
    """Console errors (and failed loads) the page logged since the last call."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] in ("SEVERE", "ERROR")]
