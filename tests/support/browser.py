"""Debian's headless Chromium, driven by Selenium through Debian's chromedriver.

Why Selenium: the dashboard's pages need a session cookie, which Chromium's
``--dump-dom``/``--screenshot`` command line cannot carry; chromedriver logs in
through the real login form, then the tests read the rendered DOM and take
screenshots. Both binaries come from Debian (``chromium``, ``chromium-driver``);
nothing is downloaded at test time (Selenium Manager is never asked: the driver's
path is given).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage", "--window-size=1440,1000", "--hide-scrollbars",
)  # fmt: skip


class BrowserUnavailable(RuntimeError):
    """Chromium or chromedriver is missing."""


def require_browser() -> None:
    """Raise BrowserUnavailable naming what to install."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        raise BrowserUnavailable(
            f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver "
            "(`make deps` does)"
        )


class Browser:
    """One headless Chromium with a fresh profile; ``login()`` then ``get()`` pages."""

    def __init__(self, base_url: str) -> None:
        require_browser()
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base = base_url
        self.profile = Path(tempfile.mkdtemp(prefix="pbx-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_page_load_timeout(30)

    def get(self, path: str) -> None:
        """Load a page of the dashboard."""
        self.driver.get(self.base + path)

    def login(self, username: str, password: str, *, then: str = "/") -> None:
        """Log in through the form, as a person would."""
        from selenium.webdriver.common.by import By

        self.get(f"/login?next={then}")
        self.driver.find_element(By.NAME, "username").send_keys(username)
        self.driver.find_element(By.NAME, "password").send_keys(password)
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait

        button = self.driver.find_element(By.CSS_SELECTOR, "button[type=submit]")
        button.click()
        # click() returns before the browser has left the page: wait until the form is gone
        # (the next page, or the form drawn again after a refusal), with a deadline.
        WebDriverWait(self.driver, 15).until(expected_conditions.staleness_of(button))

    @property
    def path(self) -> str:
        """The current URL's path (and query)."""
        url = str(self.driver.current_url)
        return url[len(self.base) :] if url.startswith(self.base) else url

    def css(self, selector: str) -> list[Any]:
        """Elements matching ``selector`` in the rendered DOM."""
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def text(self) -> str:
        """The page's visible text."""
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def screenshot(self, path: Path, *, full: bool = True) -> Path:
        """A PNG of the page (its whole height when ``full``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if full:
            height = int(self.driver.execute_script("return document.body.scrollHeight"))
            self.driver.set_window_size(1440, min(max(height + 40, 700), 4000))
        self.driver.save_screenshot(str(path))
        return path

    def close(self) -> None:
        """Quit Chromium and remove its profile."""
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
