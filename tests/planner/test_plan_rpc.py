"""PlanRecompute through a real daemon: the plan uses the blocks' tiers and the daemon's own
measured bandwidths (DRAM memcpy at start, SSD from reads, capped by ssd_read_limit)."""
from __future__ import annotations

import pytest

from kvstore.client import KVClient
from kvstore.client.errors import InvalidArgument
from kvstore.planner.recompute import PrefillProfile

from support.ssd import LAYOUT, on_ssd, put_chain, ssd_args

# ~1 ms per token, mildly quadratic: 256 tokens (16 blocks) cost ~0.26 s to recompute.
PROFILE = PrefillProfile(c0=0.001, c1=1e-3, c2=1e-8)


def test_nothing_cached_plans_nothing(daemon_factory, tmp_path):
    d = daemon_factory(*ssd_args(tmp_path / "ssd"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        plan = ns.plan_recompute(ns.block_keys(list(range(64))), PROFILE)
        assert (plan.num_cached, plan.recompute_tokens, plan.predicted_s) == (0, 0, 0.0)


def test_everything_in_dram_loads_everything(daemon_factory, tmp_path):
    d = daemon_factory(*ssd_args(tmp_path / "ssd"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, _ = put_chain(ns, 1, 16)
        plan = ns.plan_recompute(keys, PROFILE)
        assert plan.tiers == ("DRAM",) * 16 and plan.recompute_tokens == 0
        assert plan.bandwidth_bps["DRAM"] > 1e8          # memcpy-scale, measured at start
        assert plan.load_all_s < plan.recompute_all_s


def test_slow_ssd_recomputes_all_fast_ssd_loads(daemon_factory, tmp_path):
    # 16 KiB blocks capped at 20 kB/s: loading 16 blocks takes ~13 s, recomputing 0.26 s.
    d, [(keys, _)] = on_ssd(daemon_factory, tmp_path, extra=("--ssd-read-limit", "20kB/s"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        plan = ns.plan_recompute(keys, PROFILE)          # unmeasured: the daemon probes
        assert plan.tiers == ("SSD",) * 16
        assert 0 < plan.bandwidth_bps["SSD"] <= 20e3 * 1.05
        assert plan.recompute_tokens == 16 * LAYOUT.block_tokens
        assert plan.predicted_s == pytest.approx(plan.recompute_all_s)


def test_crossover_plans_a_split_never_worse_than_either(daemon_factory, tmp_path):
    d, [(keys, _)] = on_ssd(daemon_factory, tmp_path, extra=("--ssd-read-limit", "1MB/s"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        plan = ns.plan_recompute(keys, PROFILE)
        assert 0 < plan.recompute_tokens < 16 * LAYOUT.block_tokens
        assert plan.predicted_s <= min(plan.load_all_s, plan.recompute_all_s)


def test_unmeasured_profile_loads_everything(daemon_factory, tmp_path):
    d, [(keys, _)] = on_ssd(daemon_factory, tmp_path)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        plan = ns.plan_recompute(keys, PrefillProfile())
        assert plan.recompute_tokens == 0 and plan.num_cached == 16


def test_bad_profile_is_invalid_argument(daemon_factory, tmp_path):
    d = daemon_factory(*ssd_args(tmp_path / "ssd"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        with pytest.raises(InvalidArgument, match="finite"):
            ns.plan_recompute(ns.block_keys(list(range(16))), PrefillProfile(c1=-1.0))
