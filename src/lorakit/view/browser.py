"""A real headless browser for the model page: Chromium driven through chromedriver by Selenium.

    with browser() as b:
        b.get(Path("model.html").resolve().as_uri())
        b.save_screenshot("model.png")
        requests(b)          # every URL the page asked for, from Chromium's network log

Needs `selenium` (`pip install 'lorakit[browser]'`) and Chromium with its driver (Debian: `apt install
chromium chromium-driver`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


def missing() -> str | None:
    """Why a browser cannot start here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'lorakit[browser]')"
    if not any(shutil.which(c) for c in CHROMIUM):
        return f"no Chromium on PATH (looked for {', '.join(CHROMIUM)}; Debian: apt install chromium)"
    if not any(shutil.which(d) for d in DRIVER):
        return "no chromedriver on PATH (Debian: apt install chromium-driver)"
    return None


@contextmanager
def browser(width: int = 1500, height: int = 1000) -> Iterator:
    """A headless Chromium window of width × height CSS pixels that logs its network requests."""
    reason = missing()
    if reason:
        raise RuntimeError(f"cannot start a browser: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(c) for c in CHROMIUM if shutil.which(c))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--disable-background-networking", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(next(shutil.which(d) for d in DRIVER if shutil.which(d))))
    try:
        yield driver
    finally:
        driver.quit()


def requests(driver) -> list[str]:
    """The URLs of every request the page made since the last call (Chromium's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
