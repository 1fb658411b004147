"""The metrics model's parts without a daemon: histogram quantiles, rates, token files."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kvstore.access.auth import TokenEntry, bearer_token, parse_tokens_file
from kvstore.daemon.config import ConfigError
from kvstore.metrics.model import LatencyHistogram, RateMeter


def test_histogram_quantiles_within_bucket_width():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=math.log(2e-3), sigma=1.0, size=20000)
    h = LatencyHistogram()
    for s in samples:
        h.observe(float(s))
    for q in (0.5, 0.99):
        true = float(np.quantile(samples, q))
        assert true <= h.quantile(q) <= true * 1.2 * 1.01, q   # an upper bound, one bucket wide
    s = h.summary()
    assert s.count == 20000 and s.sum_s == pytest.approx(samples.sum())
    assert list(s.bucket_counts) == sorted(s.bucket_counts) and s.bucket_counts[-1] == 20000
    assert math.isinf(s.bucket_upper_s[-1])
    assert LatencyHistogram().quantile(0.5) == 0.0


def test_rate_meter_uses_the_recent_window():
    m = RateMeter(window_s=5.0)
    assert m.rate() == 0.0
    for t in range(0, 20):
        m.sample(float(t), 1000 * t if t < 10 else 10000)   # 1000 B/s, then idle
    assert m.rate() == 0.0                                    # the window saw no bytes
    m2 = RateMeter(window_s=5.0)
    for t in range(0, 20):
        m2.sample(float(t), 1000 * t)
    assert m2.rate() == pytest.approx(1000.0)


def test_tokens_file_parsing(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\n\naaaaaaaaaaaaaaaa1 alice shared  # trailing\nbbbbbbbbbbbbbbbb2 bob\n")
    f.chmod(0o640)
    t = parse_tokens_file(f)
    assert t["aaaaaaaaaaaaaaaa1"] == TokenEntry("alice", frozenset({"alice", "shared"}))
    assert t["bbbbbbbbbbbbbbbb2"] == TokenEntry("bob", frozenset({"bob"}))
    f.write_text("aaaaaaaaaaaaaaaa1 ops +admin\n")
    assert parse_tokens_file(f)["aaaaaaaaaaaaaaaa1"] == TokenEntry("ops", frozenset({"ops"}),
                                                                   admin=True)
    f.write_text("aaaaaaaaaaaaaaaa1 ops +root\n")
    with pytest.raises(ConfigError, match=r"line 1: unknown option '\+root'"):
        parse_tokens_file(f)
    f.write_text("aaaaaaaaaaaaaaaa1 alice\naaaaaaaaaaaaaaaa1 bob\n")
    with pytest.raises(ConfigError, match="line 2: duplicate token"):
        parse_tokens_file(f)
    f.write_text("aaaaaaaaaaaaaaaa1\n")
    with pytest.raises(ConfigError, match="line 1: expected 'TOKEN TENANT"):
        parse_tokens_file(f)
    with pytest.raises(ConfigError, match="No such file"):
        parse_tokens_file(tmp_path / "missing")


def test_bearer_token_header():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("x", "y")]) is None


def _stats(t: float, dram_hits: int, dram_misses: int, evictions: int, on_time: int):
    from kvstore.v1 import kvstore_pb2 as pb
    return pb.Stats(uptime_s=t, prefetch_on_time=on_time, tiers=[pb.TierStats(
        tier=pb.TIER_DRAM, capacity_bytes=100, used_bytes=40, hits=dram_hits,
        misses=dram_misses, evictions=evictions)])


def test_history_samples_are_interval_rates_in_a_bounded_ring():
    from kvstore.metrics.history import StatsHistory
    h = StatsHistory(3)
    h.record(1000.0, 0.0, _stats(0, 0, 0, 0, 0), {})
    h.record(1001.0, 2.0, _stats(2, 6, 2, 10, 4), {"get:DRAM": (1e-3, 4e-3)})
    h.record(1002.0, 3.0, _stats(3, 6, 2, 10, 4), {})
    first, second, idle = h.since()["samples"]
    assert first["tiers"]["DRAM"]["evictions_ps"] == 0.0      # no previous sample: no rate
    assert first["tiers"]["DRAM"]["hit_ratio"] is None
    d = second["tiers"]["DRAM"]
    assert d["evictions_ps"] == 5.0 and second["prefetch_on_time_ps"] == 2.0   # over 2 s
    assert d["hit_ratio"] == 0.75 and (d["get_p50_s"], d["get_p99_s"]) == (1e-3, 4e-3)
    assert d["used_bytes"] == 40 and d["capacity_bytes"] == 100
    assert idle["tiers"]["DRAM"]["hit_ratio"] is None and idle["tiers"]["DRAM"]["get_p99_s"] is None
    h.record(1003.0, 4.0, _stats(4, 6, 2, 10, 4), {})
    assert [s["t"] for s in h.since()["samples"]] == [1001.0, 1002.0, 1003.0]   # oldest dropped
    assert [s["t"] for s in h.since(1001.5)["samples"]] == [1002.0, 1003.0]
    assert h.since()["capacity"] == 3


def test_metrics_history_latency_is_the_intervals_not_since_start():
    from kvstore.metrics.model import Metrics
    from kvstore.v1 import kvstore_pb2 as pb
    now = [0.0]
    m = Metrics(None, base=lambda: pb.Stats(tiers=[pb.TierStats(tier=pb.TIER_DRAM)]),
                clock=lambda: now[0], history_samples=10, wall_clock=lambda: 1e9 + now[0])
    for _ in range(100):
        m.lookup_finished(now[0] - 0.5)           # 100 slow lookups, then a quiet second
    m.sample()
    now[0] = 1.0
    m.lookup_finished(now[0] - 1e-4)
    m.sample()
    slow, fast = m.history.since()["samples"]
    assert 0.5 <= slow["lookup_p99_s"] <= 0.5 * 1.2
    assert 1e-4 <= fast["lookup_p99_s"] <= 1.2e-4     # the slow ones are an earlier interval's
    assert m.snapshot().lookup_latency.count == 101


def test_a_held_release_is_timed_without_its_wait():
    """A release that waited in the client for its next call (client/heldreleases.py) ends
    the get's latency sample at the copy's end, not at the call that carried it."""
    from kvstore.metrics.model import Metrics
    from kvstore.v1 import kvstore_pb2 as pb
    now = [100.0]
    m = Metrics(None, lambda: pb.Stats(), clock=lambda: now[0])
    m.get_started(7, pb.TIER_SSD, 100.0)
    m.get_started(8, pb.TIER_SSD, 100.0)
    now[0] = 100.5
    m.get_finished(7, waited_s=0.3)
    m.get_finished(8)
    h = m.get_latency[pb.TIER_SSD]
    assert h.count == 2 and h.sum_s == pytest.approx(0.2 + 0.5)
    m.get_finished(7, waited_s=0.3)          # ended once: a second end is not a sample
    assert h.count == 2
