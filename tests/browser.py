"""Headless Chromium for page tests, driven through chromedriver's W3C WebDriver HTTP API.

The WebDriver protocol is plain JSON over HTTP, so httpx (already a test dependency) is all
that is needed: no browser download, no extra package. Debian's ``chromium`` and
``chromium-driver`` provide the browser and the driver.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
"""The W3C key of an element reference."""

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


def find_chromedriver() -> str | None:
    return shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Browser:
    """One chromedriver process and one browser session with a fresh profile.

    Args:
        chromium: the browser binary.
        chromedriver: the driver binary.
        profile: an empty folder for ``--user-data-dir``.
    """

    def __init__(self, chromium: Path, chromedriver: str, profile: Path) -> None:
        self.chromium = chromium
        self.chromedriver = chromedriver
        self.profile = profile
        self.driver: subprocess.Popen | None = None
        self.http: httpx.Client | None = None
        self.session = ""

    def __enter__(self) -> Browser:
        port = _free_port()
        self.driver = subprocess.Popen(
            [self.chromedriver, f"--port={port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.2)
        self.profile.mkdir(parents=True, exist_ok=True)
        options = {
            "binary": str(self.chromium),
            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"],
        }
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options}
        created = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = created["sessionId"]
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.session and self.http is not None:
                self.http.delete(f"/session/{self.session}")
        finally:
            if self.http is not None:
                self.http.close()
            if self.driver is not None:
                self.driver.terminate()
                try:
                    self.driver.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.driver.kill()
                    self.driver.wait()

    def _call(self, method: str, path: str, payload: dict | None = None) -> Any:
        assert self.http is not None
        response = self.http.request(
            method, path, content=None if payload is None else json.dumps(payload)
        )
        value = response.json()["value"]
        if response.status_code != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {value.get('message', value)}")
        return value

    def _session(self, method: str, path: str, payload: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", payload)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def find(self, selector: str) -> str:
        found = self._session("POST", "/element", {"using": "css selector", "value": selector})
        return found[ELEMENT]

    def upload(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an ``<input type=file>`` (several at once: one path per line)."""
        text = "\n".join(str(p.resolve()) for p in paths)
        self._session("POST", f"/element/{self.find(selector)}/value", {"text": text})

    def click(self, selector: str) -> None:
        self._session("POST", f"/element/{self.find(selector)}/click", {})

    def script(self, body: str, *args: Any) -> Any:
        """Run a function body in the page and return its value."""
        return self._session("POST", "/execute/sync", {"script": body, "args": list(args)})

    def set_value(self, selector: str, value: str) -> None:
        """Set an input's value and fire its ``input`` event, as a user's drag would."""
        self.script(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input', {bubbles: true}));",
            selector,
            value,
        )

    def wait_for(self, condition: str, timeout: float = 30) -> Any:
        """Poll a JavaScript expression (or a body with ``return``) until it is truthy."""
        body = condition if "return" in condition else f"return {condition};"
        deadline = time.monotonic() + timeout
        while True:
            value = self.script(body)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for: {condition}")
            time.sleep(0.25)

    def screenshot(self) -> bytes:
        """PNG of the viewport."""
        return base64.b64decode(self._session("GET", "/screenshot"))

    def element_screenshot(self, selector: str) -> bytes:
        """PNG of one element as painted (overlays included)."""
        return base64.b64decode(self._session("GET", f"/element/{self.find(selector)}/screenshot"))


def jet_pixels(rgb: np.ndarray, margin: int = 40) -> tuple[int, int]:
    """Pixels where jet's blue end and where its red end dominate a screenshot.

    Grey CT and the green mask overlay never make one of red or blue exceed both other
    channels by ``margin``; a jet heat map over them does at its cold and hot ends.
    """
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    blue = int(((b - np.maximum(r, g)) > margin).sum())
    red = int(((r - np.maximum(g, b)) > margin).sum())
    return blue, red
