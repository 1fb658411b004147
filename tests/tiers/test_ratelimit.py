"""The token bucket behind ssd_read_limit, on a fake clock."""
from __future__ import annotations

import pytest

from kvstore.daemon.config import ConfigError, load_config
from kvstore.tiers.ssd.ratelimit import TokenBucket


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def clock(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_rate_holds_over_many_reads():
    ft = FakeTime()
    b = TokenBucket(1e6, burst_bytes=64 << 10, clock=ft.clock, sleep=ft.sleep)
    for _ in range(100):
        b.take(100_000)           # 10 MB at 1 MB/s
    assert ft.t == pytest.approx(10.0 - (64 << 10) / 1e6, rel=1e-6)


def test_idle_time_refills_only_up_to_the_burst():
    ft = FakeTime()
    b = TokenBucket(1e6, burst_bytes=10_000, clock=ft.clock, sleep=ft.sleep)
    ft.t = 100.0
    assert b.take(10_000) == 0.0
    assert b.take(1_000_000) == pytest.approx(1.0)


def test_config_parses_rates_and_rejects_junk():
    assert load_config(overrides={"ssd_read_limit": "200MB/s"}, env={}).ssd_read_limit == 200_000_000
    assert load_config(env={}).ssd_read_limit == 0
    with pytest.raises(ConfigError, match="ssd_read_limit"):
        load_config(overrides={"ssd_read_limit": "fast"}, env={})
    with pytest.raises(ValueError):
        TokenBucket(0)
