"""Headless Chromium for page tests, driven over the DevTools protocol on a pipe.

    with Browser(tmp_path) as b:            # skips the test when chromium is not installed
        b.open("http://127.0.0.1:PORT/")
        b.js("document.title")              # a JavaScript expression's value
        b.screenshot(path, "#c-DRAM-occupancy")   # PNG of the page, or of one element

``--remote-debugging-pipe`` makes Chromium read protocol messages (JSON, NUL-terminated) from
fd 3 and write its answers to fd 4: no chromedriver, no WebSocket library, no port to race for.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-extensions", "--hide-scrollbars", "--mute-audio"]


def chromium_binary() -> str:
    """The chromium executable; skips the calling test when there is none (Debian: chromium)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no chromium on PATH (Debian/Ubuntu: apt-get install chromium)")


class Browser:
    """One headless Chromium with one page. Every call waits at most ``timeout_s``."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.profile = tempfile.mkdtemp(prefix="kvstore-chromium-")
        to_browser_r, self._out = os.pipe()
        self._in, from_browser_w = os.pipe()

        def fds_3_and_4():
            # In the child, before exec: the protocol's fixed descriptors. Copied high first,
            # as either pipe end may itself be 3 or 4. os.pipe's ends are close-on-exec, so
            # close_fds=False passes nothing else of ours on.
            r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
            w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)
        self.proc = subprocess.Popen(
            [chromium_binary(), *_FLAGS, "--remote-debugging-pipe",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds_3_and_4,
            close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._next_id = 0
        try:
            page = next(t for t in self._call("Target.getTargets")["targetInfos"]
                        if t["type"] == "page")
            self.session = self._call("Target.attachToTarget", targetId=page["targetId"],
                                      flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # -- the protocol ------------------------------------------------------------------------
    def _call(self, method: str, session: str | None = None, **params):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {self.timeout_s}s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise ConnectionError(
                        f"chromium exited (rc {self.proc.poll()}) during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:      # anything else is an event: ignored
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def call(self, method: str, **params):
        """A protocol command on the page."""
        return self._call(method, self.session, **params)

    # -- what tests use ----------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Navigate and wait until the new document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && "
                      "document.readyState === 'complete'")

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('text')} "
                               f"{r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0):
        """Poll until the expression is truthy; returns its value. AssertionError (with the
        page's text) on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.js(expression)
            if v:
                return v
            assert time.monotonic() < deadline, (
                f"{expression} still false after {timeout_s}s; page: "
                f"{self.js('document.body.innerText')[:2000]}")
            time.sleep(0.2)

    def screenshot(self, path: Path, selector: str | None = None) -> Path:
        """PNG of the whole page, or of the element ``selector`` names, written to path."""
        params = {"format": "png", "captureBeyondViewport": True}
        if selector:
            r = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                        ".getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY,"
                        " r.width, r.height]; })()")
            params["clip"] = dict(zip(("x", "y", "width", "height"), r), scale=1)
        else:
            w, h = self.js("[document.documentElement.scrollWidth,"
                           " document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.write(self._out, json.dumps({"id": 0, "method": "Browser.close"}).encode()
                         + b"\0")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
