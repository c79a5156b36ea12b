"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium.

Selenium is given the driver's path, so it never downloads a browser. Every page
load is followed by :meth:`Browser.errors`: what Chromium logged at SEVERE level
(console errors, failed loads of images and other resources, JavaScript
exceptions), which a dashboard page must not produce.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.peers import require

__all__ = ["Browser", "SCREENSHOTS_ENV"]

SCREENSHOTS_ENV = "PACSNODE_SCREENSHOTS"
"""A folder for the tests' screenshots (the docs' images are made this way); unset, none are taken."""


class Browser:
    """One headless Chromium window.

    Parameters
    ----------
    width, height
        The window size in CSS pixels (a phone is about 390 wide).
    """

    def __init__(self, *, width: int = 1280, height: int = 900) -> None:
        options = webdriver.ChromeOptions()
        options.binary_location = require("chromium")
        for argument in (
            "--headless=new",
            "--no-sandbox",  # tests run as root in a private network namespace
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.width = width
        self.driver = webdriver.Chrome(service=Service(require("chromedriver")), options=options)

    def get(self, url: str) -> None:
        self.driver.get(url)

    def navigate(self, action: Callable[[], object], *, timeout: float = 60) -> None:
        """Run ``action`` (a click, a submit) and wait until the next page has loaded."""
        # The old document carries a mark; the new one, once complete, does not. A script run while the
        # browser is between documents can fail: the wait ignores that and asks again.
        self.script("window.__pacsnodeOldPage = true;")
        action()
        WebDriverWait(self.driver, timeout, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.execute_script(
                "return window.__pacsnodeOldPage === undefined && document.readyState === 'complete';"
            )
        )

    def click(self, css: str) -> None:
        """Click the first element ``css`` matches and wait for the page it leads to."""
        self.navigate(self.find(css).click)

    def resize(self, width: int, height: int) -> None:
        self.width = width
        self.driver.set_window_size(width, height)

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    def errors(self) -> list[str]:
        """What Chromium logged at SEVERE level since the last call."""
        return [str(entry["message"]) for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str = "body") -> str:
        return str(self.find(css).text)

    def script(self, source: str, *args: Any) -> Any:
        return self.driver.execute_script(source, *args)

    def images_loaded(self, css: str = "img") -> list[tuple[str, int]]:
        """(src, natural width) of every image the selector matches, after each finished loading."""
        loaded = self.script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(i => [i.src, i.complete ? i.naturalWidth : -1]);",
            css,
        )
        return [(str(src), int(width)) for src, width in loaded]

    def screenshot(self, name: str, *, max_height: int = 2200, scale: float = 0.75) -> Path | None:
        """The whole page (up to ``max_height`` CSS pixels, scaled by ``scale``) as a PNG ``name`` in
        ``$PACSNODE_SCREENSHOTS``; nothing (and None) when that is not set."""
        folder = os.environ.get(SCREENSHOTS_ENV)
        if not folder:
            return None
        height = int(self.script("return document.documentElement.scrollHeight"))
        self.driver.set_window_size(self.width, min(max(height, 400), max_height))
        png = self.driver.get_screenshot_as_png()
        image = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_COLOR)
        if scale != 1:  # smaller files for the docs; text stays readable at 3/4
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert ok, "the screenshot could not be encoded"
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded.tobytes())
        return path

    def close(self) -> None:
        self.driver.quit()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
