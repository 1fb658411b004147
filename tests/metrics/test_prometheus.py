"""The metrics stack operators run: deploy/prometheus/kvstore-alerts.yml and
deploy/grafana/kvstore.json against promtool and a real Prometheus server scraping a real daemon.

- promtool checks the rules and runs their unit tests (kvstore-alerts.test.yml: alerts firing,
  and not firing, on synthetic series);
- a Prometheus server scrapes a daemon on a cluster tier once a second; every metric name the
  dashboard's queries use has series, every query evaluates to data, values match the daemon,
  and the alert rules load and evaluate without error.

Prometheus and promtool come from Debian's `prometheus` package (.ci/run installs it); the tests
skip, saying so, only when the binaries are absent.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from support.net import free_port
from kvstore.client import KVClient
from kvstore.core.layout import KVLayout

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "kvstore-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "kvstore-alerts.test.yml"
EXAMPLE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "kvstore.json"


def _binary(name: str) -> str:
    exe = shutil.which(name)
    if not exe:
        pytest.skip(f"{name} not installed (Debian/Ubuntu: apt-get install prometheus)")
    return exe


def _alert_names() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules_and_the_example_config():
    promtool = _binary("promtool")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "config", str(EXAMPLE_CONFIG)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {"KVStoreDown", "KVStoreTierThrashing", "KVStoreChecksumFailures",
            "KVStoreRemoteCircuitOpen", "KVStoreAuthFailures"} <= set(_alert_names())
    # The example's job is the one the rules select, and it loads the rules beside it.
    example = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert [j["job_name"] for j in example["scrape_configs"]] == ["kvstore"]
    assert 'up{job="kvstore"}' in RULES.read_text() and example["rule_files"] == [RULES.name]


def test_alert_rules_unit_tests(tmp_path):
    """promtool's unit tests pass, and they can fail: the same tests against rules whose
    thrashing threshold no longer tells a busy cache from a thrashing one do not."""
    promtool = _binary("promtool")
    r = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == set(_alert_names()), "every alert has a unit test"
    (tmp_path / "kvstore-alerts.yml").write_text(RULES.read_text().replace("> 0.5", "> 0.05"))
    shutil.copy(RULE_TESTS, tmp_path)
    r = subprocess.run([promtool, "test", "rules", str(tmp_path / RULE_TESTS.name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and 'instance="node-b:9400"' in r.stdout + r.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, template variables as Grafana
    expands them for "All" daemons and a short rate window."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for p in doc["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "15s").replace("$instance", ".*")
            out.append((p["title"], expr))
    return out


_NOT_METRICS = {"sum", "by", "rate", "histogram_quantile", "le", "instance", "tier", "outcome",
                "job", "state", "and", "on", "or", "without", "increase", "max", "min"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside {...} and
    by (...) lists, and not function names or keywords."""
    bare = re.sub(r"\{[^}]*\}", "", expr)                     # label matchers
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)                    # range selectors
    return {w for w in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", bare)
            if w not in _NOT_METRICS and not re.fullmatch(r"\d.*", w)}


def test_dashboard_query_parsing():
    assert metric_names('sum by (le, tier) (rate(kvstore_get_latency_seconds_bucket'
                        '{instance=~".*"}[15s]))') == {"kvstore_get_latency_seconds_bucket"}
    assert metric_names('kvstore_tier_used_bytes / (kvstore_tier_capacity_bytes > 0)') == \
        {"kvstore_tier_used_bytes", "kvstore_tier_capacity_bytes"}
    names = set().union(*(metric_names(e) for _, e in dashboard_queries()))
    # what the dashboard must show, by name
    for needed in ("kvstore_tier_used_bytes", "kvstore_tier_hits_total",
                   "kvstore_tier_bytes_out_total", "kvstore_get_latency_seconds_bucket",
                   "kvstore_lookup_latency_seconds_bucket", "kvstore_tier_evictions_total",
                   "kvstore_tier_promotions_total", "kvstore_tier_demotions_total",
                   "kvstore_prefetch_total", "kvstore_remote_queue_depth",
                   "kvstore_remote_circuit", "kvstore_checksum_failures_total",
                   "kvstore_auth_failures_total", "up"):
        assert needed in names, needed


def _dashboard_is_importable():
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "instance"}
    for p in doc["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + \
            p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"


class Prometheus:
    """A Prometheus server on a free loopback port, its data in ``workdir``."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "kvstore", "static_configs": [{"targets": targets}]}],
        }))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [_binary("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.logfile = workdir / "prometheus.log"

    def api(self, path: str, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait(self, what: str, ok, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, \
                f"prometheus exited:\n{self.logfile.read_text()[-3000:]}"
            try:
                v = ok()
                if v:
                    return v
            except OSError:
                pass          # not listening yet
            assert time.monotonic() < deadline, \
                f"{what} after {timeout_s}s; prometheus log:\n{self.logfile.read_text()[-3000:]}"
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def _cluster_backend() -> str:
    from kvstore.bench.cluster_engines import skip_reason
    for backend in ("redis", "mooncake"):
        if skip_reason(backend) is None:
            return backend
    pytest.skip(f"no cluster engine for the remote series: {skip_reason('redis')}; "
                f"{skip_reason('mooncake')}")


def test_prometheus_scrapes_every_series_the_dashboard_queries(daemon_factory, tmp_path):
    from kvstore.bench.cluster_engines import start_engine
    _binary("prometheus")
    _dashboard_is_importable()
    engine = start_engine(_cluster_backend(), tmp_path / "engine")
    prom = None
    try:
        port = free_port()
        d = daemon_factory("--dram-bytes", "8MiB", "--chunk-bytes", "1MiB", "--metrics-port",
                           str(port), "--remote", engine.url, "--remote-deadline-s", "1",
                           "--remote-read-deadline-s", "2", "--remote-segment-bytes", "32MiB",
                           "--remote-buffer-bytes", "16MiB")
        # Traffic for every histogram and counter family: puts past the 8 MiB tier (evictions),
        # gRPC lookups and leased gets (latency buckets), a prefetch.
        with KVClient(d.socket) as client:
            layout = KVLayout(2, 4, 64, block_tokens=16, dtype="uint8")       # 16 KiB blocks
            ns = client.namespace("prom-model", layout)
            ns.local_lookups = ns.local_gets = False
            n = 640                                                          # 10 MiB
            keys = ns.block_keys(np.arange(n * 16) % 50000)
            data = np.full((n, *layout.block_shape), 7, dtype=np.uint8)
            for i in range(0, n, 64):
                assert ns.put(keys[i:i + 64], data[i:i + 64]).result(timeout=30) == 64
            assert ns.lookup(keys[-64:]).num_cached == 64
            assert len(ns.get(keys[-16:]).result(timeout=30)) == 16
            ns.prefetch(keys[-8:])
            prom = Prometheus(tmp_path, [f"127.0.0.1:{port}"], RULES)
            # Enough scrapes for rate() over the 15 s window the queries are run with.
            prom.wait("5 successful scrapes", lambda: any(
                float(s["value"][1]) >= 5 for s in
                prom.query('count_over_time(up{job="kvstore"}[1m]) and up{job="kvstore"} == 1')))
            st = client.stats()

        names = set()
        for title, expr in dashboard_queries():
            names |= metric_names(expr)
            result = prom.query(expr)
            assert result, f"panel {title!r}: {expr} returns no data"
        for name in sorted(names):
            series = prom.api("series", **{"match[]": name, "start": time.time() - 120})
            assert series, f"{name}: the dashboard queries it, the daemon does not export it"

        # Values: Prometheus holds what the daemon reports.
        dram = next(t for t in st.tiers if str(t.tier) == "DRAM")
        (cap,) = prom.query('kvstore_tier_capacity_bytes{tier="DRAM"}')
        assert float(cap["value"][1]) == dram.capacity_bytes == 8 << 20
        (ev,) = prom.query('kvstore_tier_evictions_total{tier="DRAM"}')
        assert float(ev["value"][1]) == dram.evictions > 0
        (lookups,) = prom.query("kvstore_lookup_latency_seconds_count")
        assert float(lookups["value"][1]) >= 1
        circuit = {s["metric"]["state"]: float(s["value"][1])
                   for s in prom.query("kvstore_remote_circuit")}
        assert circuit == {"closed": 1.0, "open": 0.0, "half_open": 0.0}

        # The alert rules load, evaluate without error, and none fires on a healthy daemon.
        def evaluated():
            groups = prom.api("rules", type="alert")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None
        rules = prom.wait("alert rules evaluated", evaluated)
        assert sorted(r["name"] for r in rules) == sorted(_alert_names())
        assert all(r["state"] == "inactive" for r in rules), [
            (r["name"], r["state"]) for r in rules]
    finally:
        if prom:
            prom.close()
        engine.stop()
