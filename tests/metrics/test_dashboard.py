"""The built-in page in a real headless Chromium: its charts draw the daemon's history (from
before the page opened) and live data, with axes, and show the figures `kvstore stats` has.

Chromium comes from Debian (`chromium`; .ci/run installs it); the tests skip, saying so, only
when it is not installed. tests/support/browser.py drives it over the DevTools protocol; the
tests check screenshots of the chart canvases pixel by pixel.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from support.browser import Browser
from support.net import free_port, read_png
from kvstore.client import KVClient
from kvstore.core.layout import KVLayout

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
    try:
        with Browser() as b:
            b.open(f"http://127.0.0.1:{port}/")
            b.wait_for("Number(document.body.dataset.samples) >= 4")
            # Lease-free reads reach the daemon's counters when the client reports them (in
            # batches): wait for a second whose hit rate the daemon could tell.
            b.wait_for("history.some(s => s.tiers.DRAM && s.tiers.DRAM.hit_ratio !== null) &&"
                       " Number(document.body.dataset.samples) >= 6")
            b.screenshot(tmp_path / "dashboard.png")     # for a human, when the test fails
            for chart in ("occupancy", "hit_rate", "bandwidth"):
                shot = b.screenshot(tmp_path / f"{chart}.png", f"#c-DRAM-{chart}")
                _, h, _ = read_png(shot)
                rows = _colored_rows(shot)
                assert rows, f"{chart}: no chart pixels in the screenshot"
                # Data, not an empty axis: occupancy ~60%, hit rate 100% and the bandwidth
                # peak (the axis scales to it) all reach the upper half of the canvas.
                assert min(rows) < h / 2, f"{chart}: drawn only below the middle ({rows[:5]})"
            caption = b.js("document.getElementById('c-DRAM-hit_rate-cap').textContent")
            assert caption.startswith("hit rate 100.0%")
    finally:
        stop.set()
        t.join(5)
        client.close()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _busy_then_idle(daemon_factory) -> tuple[int, dict]:
    """A daemon with a metrics port that saw a few seconds of puts (past its 16 MiB DRAM tier:
    evictions), gRPC lookups and leased gets, then went idle until its current bandwidth reads
    0. Returns (metrics port, /api/stats then)."""
    port = free_port()
    d = daemon_factory("--dram-bytes", "16MiB", "--chunk-bytes", "2MiB", "--metrics-port",
                       str(port), "--metrics-history-s", "120")
    with KVClient(d.socket) as client:
        ns = client.namespace("hist-model", KVLayout(4, 8, 128, block_tokens=16,
                                                     dtype="float16"))   # 128 KiB blocks
        ns.local_lookups = ns.local_gets = False   # over gRPC: the daemon times both
        n = 192                                     # 24 MiB into 16 MiB
        keys = ns.block_keys(np.arange(n * 16) % 50000)
        kv = np.ones((n, *ns.layout.block_shape), dtype=np.float16)
        for i in range(0, n, 32):                   # spread over ~3 s: several samples
            assert ns.put(keys[i:i + 32], kv[i:i + 32]).result(timeout=30) == 32
            assert ns.lookup(keys[i:i + 32]).num_cached == 32
            assert len(ns.get(keys[i:i + 8]).result(timeout=30)) == 8
            time.sleep(0.5)
    url = f"http://127.0.0.1:{port}/api/stats"
    deadline = time.monotonic() + 30
    while True:     # the recent-bandwidth window (5 s) empties: "now" shows no traffic
        st = _get_json(url)
        dram = next(t for t in st["tiers"] if t["tier"] == "DRAM")
        if dram["read_bps"] == 0 and dram["write_bps"] == 0:
            break
        assert time.monotonic() < deadline, dram
        time.sleep(0.5)
    assert dram["evictions"] > 0 and st["lookups"] >= 6
    return port, st


def test_history_endpoint_serves_samples_recorded_before_it_is_asked(daemon_factory):
    port, st = _busy_then_idle(daemon_factory)
    asked_at = time.time()
    h = _get_json(f"http://127.0.0.1:{port}/api/history")
    samples = h["samples"]
    assert h["capacity"] == 120 and len(samples) >= 5
    assert all(s["t"] <= asked_at for s in samples)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    dram = [s["tiers"]["DRAM"] for s in samples]
    # The busy seconds are in the history although the daemon is idle now.
    assert max(r["write_bps"] for r in dram) > 1 << 20
    assert max(r["read_bps"] for r in dram) > 0
    assert dram[-1]["write_bps"] == 0 and dram[-1]["read_bps"] == 0
    assert any(r["get_p99_s"] for r in dram) and any(s["lookup_p99_s"] for s in samples)
    assert any(r["hit_ratio"] == 1.0 for r in dram)                   # every get hit
    assert max(r["used_bytes"] for r in dram) <= dram[0]["capacity_bytes"] == 16 << 20
    # Evictions per second, integrated over the samples' intervals, add up to the counter.
    evicted = sum(r["evictions_ps"] * (b["t"] - a["t"])
                  for a, b, r in zip(samples, samples[1:], dram[1:]))
    total = next(t for t in st["tiers"] if t["tier"] == "DRAM")["evictions"]
    assert evicted == pytest.approx(total, rel=0.15)
    later = _get_json(f"http://127.0.0.1:{port}/api/history?after={samples[-1]['t']}")
    assert all(s["t"] > samples[-1]["t"] for s in later["samples"])
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/history?after=yesterday",
                               timeout=10)
    assert e.value.code == 400


# Canvas geometry in dashboard.html (W, H, PAD): the plot area and the margins holding the axes.
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 420, 180, 74, 10, 10, 34


def _pixels(png: Path) -> np.ndarray:
    w, h, rows = read_png(png)
    a = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(h, w, -1)[:, :, :3].astype(int)
    assert (w, h) == (_W + 2, _H + 2) or (w, h) == (_W, _H), (w, h)   # with or without border
    return a[1:-1, 1:-1] if w == _W + 2 else a


def test_page_draws_the_history_from_before_it_opened_with_axes(daemon_factory, tmp_path):
    port, st = _busy_then_idle(daemon_factory)
    recorded = len(_get_json(f"http://127.0.0.1:{port}/api/history")["samples"])
    with Browser() as b:
        b.open(f"http://127.0.0.1:{port}/")
        b.wait_for("Number(document.body.dataset.samples) >= 1")
        b.screenshot(tmp_path / "dashboard.png")       # for a human, when the test fails
        # The first render already has every sample the daemon had: nothing starts empty.
        assert int(b.js("document.body.dataset.history")) >= recorded
        charts = {"DRAM": ["occupancy", "hit_rate", "bandwidth", "get_latency", "movement"],
                  "daemon": ["lookup_latency", "prefetch", "errors"]}
        # Charts of what happened before the page opened (the daemon is idle now): their
        # lines reach the upper half of the plot (the axis scales to the peak; occupancy and
        # hit rate are fractions of a fixed 100%).
        peaks = {("DRAM", "occupancy"), ("DRAM", "hit_rate"), ("DRAM", "bandwidth"),
                 ("DRAM", "get_latency"), ("DRAM", "movement"), ("daemon", "lookup_latency")}
        for box, keys in charts.items():
            for key in keys:
                px = _pixels(b.screenshot(tmp_path / f"{box}-{key}.png", f"#c-{box}-{key}"))
                plot = px[_TOP:_H - _BOTTOM + 1, _LEFT:_W - _RIGHT]
                coloured = (plot.max(axis=2) - plot.min(axis=2)) > 40
                assert coloured.sum() >= 20, f"{box} {key}: no line in the plot area"
                if (box, key) in peaks:
                    top = np.nonzero(coloured.any(axis=1))[0].min()
                    assert top < plot.shape[0] / 2, f"{box} {key}: line only below the middle"
                # Axes: tick labels and the unit title (dark grey text) in the left margin,
                # clock times and the time-axis title under the plot.
                ink = px.max(axis=2) < 160
                assert ink[:, :_LEFT - 2].sum() >= 60, f"{box} {key}: no value axis labels"
                assert ink[_H - _BOTTOM + 4:, _LEFT:].sum() >= 100, f"{box} {key}: no time axis"
        units = b.js("Object.fromEntries([...document.querySelectorAll('canvas')]"
                     ".map(c => [c.id, c.dataset.unit]))")
        assert units["c-DRAM-bandwidth"] == "bytes/s" and units["c-DRAM-get_latency"] == "ms"
        assert units["c-DRAM-occupancy"] == "% used"
        assert units["c-daemon-prefetch"] == "prefetches/s"
        # The figures `kvstore stats` prints, from /api/stats.
        row = b.js("[...document.querySelectorAll('#row-DRAM td')].map(td => td.textContent)")
        heads = b.js("[...document.querySelectorAll('#tier-table th')].map(th => th.textContent)")
        dram = next(t for t in st["tiers"] if t["tier"] == "DRAM")
        cell = dict(zip(heads, row))
        assert cell["evictions"] == str(dram["evictions"]) and cell["hit rate"] == "100.0%"
        assert cell["get p50/p99 ms"] != "-/-"
        assert b.js("document.getElementById('fig-lookups').textContent") == str(st["lookups"])
        assert b.js("document.getElementById('fig-lookup_latency').textContent") != "-/-"
        for fig in ("prefetch_on_time", "prefetch_late", "prefetch_wasted", "checksum_failures",
                    "auth_failures"):
            assert b.js(f"document.getElementById('fig-{fig}').textContent") == str(st[fig])
        assert "evictions" in b.js("document.getElementById('c-DRAM-movement-cap').textContent")


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
    backend = _remote_backend()
    engine = start_engine(backend, tmp_path / "engine")
    layout = KVLayout(2, 4, 64, block_tokens=16, dtype="uint8")     # 16 KiB blocks
    remote_args = ["--dram-bytes", "8MiB", "--chunk-bytes", "1MiB", "--remote", engine.url,
                   "--remote-deadline-s", "0.3", "--remote-read-deadline-s", "2",
                   "--remote-retry-s", "30", "--remote-segment-bytes", "32MiB",
                   "--remote-buffer-bytes", "16MiB"]
    port = free_port()
    b = None
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

            b = Browser()
            b.open(f"http://127.0.0.1:{port}/")
            b.wait_for("Number(document.body.dataset.samples) >= 3")
            b.screenshot(tmp_path / "dashboard.png")
            cells = b.js(
                "(() => { const o = {}; for (const td of document.querySelectorAll("
                "'#remote-row td')) o[td.id.slice(7)] = td.textContent; return o; })()")
            row = api_row()        # nothing moves B's counters now: the page shows these values
            for field in ("hits", "misses", "queue_depth", "circuit_state", "io_errors",
                          "timeouts", "checksum_failures", "writes_skipped",
                          "writes_deduplicated"):
                assert cells[field] == str(row[field]), (field, cells, row)
            assert cells["hits"] == "8" and cells["misses"] == "4"
            assert cells["circuit_state"] == "closed"
            assert cells["bytes_out"] == "128.0 KiB"
            assert cells["hit_rate"] == "66.7%"
            assert b.js("document.getElementById('remote-backend').textContent") == engine.url
            assert b.js("document.getElementById('remote-circuit').dataset.state") == "closed"
            # the remote tier draws no occupancy chart (it has no capacity of its own)
            assert b.js("document.getElementById('c-REMOTE-occupancy') === null")
            for chart in ("hit_rate", "bandwidth"):
                shot = b.screenshot(tmp_path / f"remote-{chart}.png", f"#c-REMOTE-{chart}")
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
            b.wait_for("document.getElementById('remote-circuit').dataset.state === 'open'", 15)
            assert b.js("document.getElementById('remote-circuit').textContent") == "circuit open"
            b.screenshot(tmp_path / "dashboard-open.png")
    finally:
        if b:
            b.close()
        engine.stop()
