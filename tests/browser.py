"""A real headless Chromium for the console's browser tests: Debian's `chromium` driven through
Debian's `chromium-driver` (/usr/bin/chromedriver) by Selenium. Nothing is downloaded: without
those packages (or selenium) the tests FAIL with a message naming what to install — they never
pass or skip silently.

`open_browser()` returns a WebDriver with a laptop-sized window (SCREEN); `screenshot()` writes
a whole page's PNG into SCREENSHOTS (docs/console/ when regenerating the committed ones). The caller quits the
driver. Below them, the helpers every console test drives the pages with (sign_in, open_page,
by_css, text_at, click, script_errors).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

SCREEN = (1366, 900)  # a laptop screen
# the committed screenshots (docs/console/, linked from the README) are rewritten only when asked:
#   SCREENSHOT_DIR=docs/console .venv/bin/python -m pytest tests/test_console_flow.py
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "loraplex-console-screenshots")
INSTALL = "apt-get install -y chromium chromium-driver"
_T = TypeVar("_T")


def _executables() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    missing = [name for name, path in (("chromium", browser), ("chromium-driver (chromedriver)", driver)) if path is None]
    if missing:
        pytest.fail(f"the console's browser tests need Debian's {' and '.join(missing)}: run `{INSTALL}` "
                    "(.ci/run does); they drive a real headless Chromium and are never skipped", pytrace=False)
    return browser, driver


def open_browser(profile_dir: Path):
    """A headless Chromium at SCREEN size, its profile in `profile_dir`. Fails (not skips)
    when chromium, chromedriver or selenium is missing."""
    browser, driver = _executables()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the console's browser tests need selenium (the dev extra: pip install -e '.[dev]')", pytrace=False)
    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--force-device-scale-factor=1", "--hide-scrollbars",
                f"--window-size={SCREEN[0]},{SCREEN[1]}", f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait_for(check: Callable[[], _T], what: str, timeout_s: float = 120.0) -> _T:
    """Poll `check` until it returns something truthy (a deadlock guard, not a speed bound)."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # an element not there yet, a stale element
            last_error = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r})")


def screenshot(driver, name: str, max_height: int = 1600) -> Path:
    """Save the whole page (its full width, up to `max_height` CSS pixels from the top) as
    SCREENSHOTS/<name>.png, through Chromium's own capture (DevTools `Page.captureScreenshot`)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def text_of(driver, element) -> str:
    """An element's exact textContent (WebDriver's `.text` trims and collapses whitespace)."""
    return driver.execute_script("return arguments[0].textContent", element)


# --- driving the console (one home for the helpers every console test uses)

def by_css(driver, selector: str):
    return driver.find_element("css selector", selector)


def text_at(driver, selector: str) -> str:
    """The textContent of what `selector` finds now, read in one script ('' when nothing matches;
    pages that re-render at every poll may replace an element found earlier)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''", selector)


def open_page(driver, server, page: str) -> None:
    """Load a console page afresh (a reload: the tab's session survives it)."""
    driver.get(f"{server.url}/console/#/{page}")
    driver.refresh()


def sign_in(driver, server, account_id: str, token: str) -> None:
    """Fill and send the sign-in form from a fresh tab session (no wait for the outcome)."""
    driver.get(server.url + "/console/")
    driver.execute_script("sessionStorage.clear()")
    open_page(driver, server, "finetunes")
    account = wait_for(lambda: by_css(driver, "#account-id"), "the sign-in form")
    account.send_keys(account_id)
    by_css(driver, "#api-token").send_keys(token)
    by_css(driver, "#sign-in").click()


def script_errors(driver) -> list[str]:
    """The browser's SEVERE log lines since the last call that are script or security errors or a
    failed load of the console's own files (refused API calls are expected answers, not counted)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and (e["source"] in ("javascript", "security") or "/console/" in e["message"])]


def click(driver, selector: str, what: str) -> None:
    """Find and click `selector`, again if a polling page replaced the element in between (a
    stale element) or has not drawn it yet."""
    wait_for(lambda: by_css(driver, selector).click() or True, what)
