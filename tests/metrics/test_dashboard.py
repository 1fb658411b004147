"""The dashboard in a real headless Chromium: its charts render with live data.

Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`); the test installs them
with apt-get when they are missing and skips, saying why, only when that is impossible. It
drives the browser over the W3C WebDriver protocol (plain HTTP, no selenium) and checks
screenshots of the chart canvases, pixel by pixel.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from support.net import free_port, read_png
from kvstore.client import KVClient
from kvstore.core.layout import KVLayout

_BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,900"]


def _ensure_chromium() -> tuple[str, str]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("chromium/chromium-driver missing and apt-get unavailable (not root)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium",
                     "chromium-driver"]):
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if r.returncode:
                pytest.skip(f"cannot install chromium: {' '.join(cmd)} failed: "
                            f"{r.stderr.strip()[-300:]}")
    return shutil.which("chromium"), shutil.which("chromedriver")


class WebDriver:
    """The few W3C WebDriver commands this test needs."""

    def __init__(self, chromedriver: str, chromium: str, profile: str):
        self.port = free_port()
        self.proc = subprocess.Popen([chromedriver, f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium, "args": _BROWSER_FLAGS + [f"--user-data-dir={profile}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["value"]

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def script(self, js: str):
        return self.cmd("POST", "/execute/sync", {"script": js, "args": []})

    def close(self) -> None:
        try:
            self.cmd("DELETE", "")
        except OSError:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _colored_rows(png: Path) -> list[int]:
    """Rows of the image that hold saturated (chart-coloured) pixels; white/grey don't count."""
    _, _, rows = read_png(png)
    out = []
    for y, row in enumerate(rows):
        px = np.frombuffer(row, dtype=np.uint8).reshape(-1, 4)[:, :3].astype(int)
        if int(((px.max(axis=1) - px.min(axis=1)) > 40).sum()) >= 3:
            out.append(y)
    return out


def test_dashboard_charts_render_live_data(daemon_factory, tmp_path):
    chromium, chromedriver = _ensure_chromium()
    port = free_port()
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB",
                       "--metrics-port", str(port))
    client = KVClient(d.socket)
    ns = client.namespace("dash-model", KVLayout(4, 8, 128, block_tokens=16, dtype="float16"))
    bb = ns.layout.block_bytes                                   # 128 KiB blocks
    n = (40 << 20) // bb                                         # fill ~60% of the tier
    keys = ns.block_keys(np.arange(n * 16) % 50000)
    kv = np.ones((n, *ns.layout.block_shape), dtype=np.float16)
    for i in range(0, n, 64):
        ns.put(keys[i:i + 64], kv[i:i + 64]).result()
    stop = threading.Event()

    def traffic():  # keeps the recent-bandwidth window busy while the page polls
        while not stop.is_set():
            ns.get(keys[:32]).result()
            time.sleep(0.05)
    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    profile = tempfile.mkdtemp(prefix="kvstore-chromium-")
    wd = None
    try:
        wd = WebDriver(chromedriver, chromium, profile)
        wd.cmd("POST", "/url", {"url": f"http://127.0.0.1:{port}/"})
        deadline = time.monotonic() + 30
        while int(wd.script("return document.body.dataset.samples || 0")) < 4:
            assert time.monotonic() < deadline, wd.script("return document.body.innerText")
            time.sleep(0.25)
        page = base64.b64decode(wd.cmd("GET", "/screenshot"))
        (tmp_path / "dashboard.png").write_bytes(page)   # for a human, when the test fails
        for chart in ("occupancy", "hit_rate", "bandwidth"):
            el = wd.cmd("POST", "/element", {"using": "css selector",
                                             "value": f"#c-DRAM-{chart}"})
            eid = next(iter(el.values()))
            shot = tmp_path / f"{chart}.png"
            shot.write_bytes(base64.b64decode(wd.cmd("GET", f"/element/{eid}/screenshot")))
            w, h, _ = read_png(shot)
            rows = _colored_rows(shot)
            assert rows, f"{chart}: no chart pixels in the screenshot"
            # Data, not an empty axis: occupancy ~60%, hit rate 100% and the bandwidth peak
            # (the chart scales to it) all reach the upper half of the canvas.
            assert min(rows) < h / 2, f"{chart}: drawn only below the middle (rows {rows[:5]})"
        caption = wd.script("return document.getElementById('c-DRAM-hit_rate-cap').textContent")
        assert caption.startswith("hit rate 100.0%")
    finally:
        stop.set()
        t.join(5)
        if wd:
            wd.close()
        shutil.rmtree(profile, ignore_errors=True)
        client.close()


def _remote_backend() -> str:
    from kvstore.bench.cluster_engines import skip_reason
    for backend in ("mooncake", "redis"):        # Mooncake first: its master starts in ~0.5 s
        if skip_reason(backend) is None:
            return backend
    pytest.skip(f"no cluster engine here: {skip_reason('mooncake')}; {skip_reason('redis')}")


def test_dashboard_remote_panel_shows_the_cluster_tier(daemon_factory, tmp_path):
    """A daemon on a real cluster engine: the REMOTE panel shows its stats row (the same values
    /api/stats serves), its charts draw, and the circuit badge turns open when the engine dies."""
    from kvstore.bench.cluster_engines import start_engine
    chromium, chromedriver = _ensure_chromium()
    backend = _remote_backend()
    engine = start_engine(backend, tmp_path / "engine")
    layout = KVLayout(2, 4, 64, block_tokens=16, dtype="uint8")     # 16 KiB blocks
    remote_args = ["--dram-bytes", "8MiB", "--chunk-bytes", "1MiB", "--remote", engine.url,
                   "--remote-deadline-s", "0.3", "--remote-read-deadline-s", "2",
                   "--remote-retry-s", "30", "--remote-segment-bytes", "32MiB",
                   "--remote-buffer-bytes", "16MiB"]
    port = free_port()
    wd = None
    profile = tempfile.mkdtemp(prefix="kvstore-chromium-")
    try:
        a = daemon_factory(*remote_args, workdir=tmp_path / "a")
        b = daemon_factory(*remote_args, "--metrics-port", str(port), workdir=tmp_path / "b")
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            nsa = ca.namespace("dash-remote", layout)
            rng = np.random.default_rng(5)
            data = rng.integers(0, 256, (8, *layout.block_shape), dtype=np.uint8)
            keys = nsa.block_keys(rng.integers(0, 50000, 8 * 16))
            assert nsa.put(keys, data).result(timeout=30) == 8
            deadline = time.monotonic() + 20
            while next(t for t in ca.stats().tiers if t.tier == 4).bytes_in < 8 * (16 << 10):
                assert time.monotonic() < deadline, "host A's remote writes did not complete"
                time.sleep(0.05)
            nsb = cb.namespace("dash-remote", layout)
            out = np.empty_like(data)
            got = nsb.get(keys, out=out).result(timeout=30)       # 8 remote hits on B
            assert len(got) == 8 and np.array_equal(out, data)
            other = nsb.block_keys(rng.integers(0, 50000, 4 * 16))
            assert len(nsb.get(other).result(timeout=30)) == 0     # 4 remote misses

            def api_row() -> dict:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=10) as r:
                    st = json.loads(r.read())
                return next(t for t in st["tiers"] if t["tier"] == "REMOTE")
            row = api_row()
            assert row["hits"] == 8 and row["misses"] == 4 and row["bytes_out"] == 8 * (16 << 10)
            assert row["circuit_state"] == "closed"

            wd = WebDriver(chromedriver, chromium, profile)
            wd.cmd("POST", "/url", {"url": f"http://127.0.0.1:{port}/"})

            def page_samples() -> int:
                return int(wd.script("return document.body.dataset.samples || 0"))
            deadline = time.monotonic() + 30
            while page_samples() < 3:
                assert time.monotonic() < deadline, wd.script("return document.body.innerText")
                time.sleep(0.25)
            (tmp_path / "dashboard.png").write_bytes(base64.b64decode(wd.cmd("GET", "/screenshot")))
            cells = wd.script(
                "const o = {}; for (const td of document.querySelectorAll('#remote-row td'))"
                " o[td.id.slice(7)] = td.textContent; return o;")
            row = api_row()        # nothing moves B's counters now: the page shows these values
            for field in ("hits", "misses", "queue_depth", "circuit_state", "io_errors",
                          "timeouts", "checksum_failures", "writes_skipped",
                          "writes_deduplicated"):
                assert cells[field] == str(row[field]), (field, cells, row)
            assert cells["hits"] == "8" and cells["misses"] == "4"
            assert cells["circuit_state"] == "closed"
            assert cells["bytes_out"] == "128.0 KiB"
            assert cells["hit_rate"] == "66.7%"
            assert wd.script("return document.getElementById('remote-backend').textContent") \
                == engine.url
            assert wd.script("return document.getElementById('remote-circuit').dataset.state") \
                == "closed"
            # the remote tier draws no occupancy chart (it has no capacity of its own)
            assert wd.script("return document.getElementById('c-REMOTE-occupancy')") is None
            for chart in ("hit_rate", "bandwidth"):
                el = wd.cmd("POST", "/element", {"using": "css selector",
                                                 "value": f"#c-REMOTE-{chart}"})
                shot = tmp_path / f"remote-{chart}.png"
                shot.write_bytes(base64.b64decode(
                    wd.cmd("GET", f"/element/{next(iter(el.values()))}/screenshot")))
                _, h, _ = read_png(shot)
                rows = _colored_rows(shot)
                # hit rate 8/12 and the read-bandwidth peak (the chart scales to it) both reach
                # the upper half of the canvas
                assert rows and min(rows) < h / 2, f"REMOTE {chart}: rows {rows[:5]}"

            # The engine dies: B's lookups miss their deadline, the circuit opens, the page shows it.
            engine.stop()
            deadline = time.monotonic() + 30
            while api_row()["circuit_state"] != "open":
                assert time.monotonic() < deadline, f"circuit never opened: {api_row()}"
                assert nsb.lookup(nsb.block_keys(rng.integers(0, 50000, 4 * 16))).num_cached == 0
            deadline = time.monotonic() + 15
            while wd.script("return document.getElementById('remote-circuit').dataset.state") \
                    != "open":
                assert time.monotonic() < deadline, wd.script("return document.body.innerText")
                time.sleep(0.25)
            assert wd.script("return document.getElementById('remote-circuit').textContent") \
                == "circuit open"
            (tmp_path / "dashboard-open.png").write_bytes(
                base64.b64decode(wd.cmd("GET", "/screenshot")))
    finally:
        if wd:
            wd.close()
        shutil.rmtree(profile, ignore_errors=True)
        engine.stop()
