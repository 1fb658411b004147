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
