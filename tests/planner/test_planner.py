"""The partial-recomputation planner's cost model and its edge cases."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.planner.recompute import PrefillProfile, plan_recompute

MB = 1e6
BB = 4 * 1024 * 1024  # 4 MiB blocks


def prof(c1=1e-3, c2=0.0):
    return PrefillProfile(0.0, c1, c2)


def test_nothing_cached():
    p = plan_recompute([], 16, BB, {"DRAM": 10e9}, prof())
    assert p.recompute_tokens == 0 and p.predicted_s == 0


def test_everything_in_fast_dram_loads_everything():
    # computing one block (160 ms) takes longer than loading all 64 (27 ms)
    p = plan_recompute(["DRAM"] * 64, 16, BB, {"DRAM": 10e9}, prof(c1=1e-2))
    assert p.recompute_tokens == 0
    assert p.predicted_s == pytest.approx(64 * BB / 10e9)


def test_zero_bandwidth_recomputes_everything():
    p = plan_recompute(["SSD"] * 8, 16, BB, {"SSD": 0.0}, prof())
    assert p.recompute_tokens == 8 * 16
    assert p.predicted_s == pytest.approx(prof().seconds(128))


def test_unmeasured_throughput_loads_everything_when_it_can():
    p = plan_recompute(["SSD"] * 8, 16, BB, {"SSD": 100 * MB}, PrefillProfile())
    assert p.recompute_tokens == 0
    p = plan_recompute(["SSD"] * 8, 16, BB, {}, PrefillProfile())
    assert p.recompute_tokens == 8 * 16


def test_crossover_splits_and_beats_both_extremes():
    # 128 blocks of 16 tokens; compute 1 ms/token, load 4 MiB at 2 GB/s ~ 2.1 ms/block
    # -> compute 16 ms/block vs load 2.1 ms/block: tune bandwidth so both are equal-ish
    bw = BB / 16e-3  # load one block in 16 ms, same as computing it
    p = plan_recompute(["SSD"] * 128, 16, BB, {"SSD": bw}, prof())
    assert 0 < p.recompute_tokens < 128 * 16
    assert p.predicted_s <= min(p.load_all_s, p.recompute_all_s)
    assert p.speedup_vs_best_extreme == pytest.approx(2.0, rel=0.05)
    assert abs(p.compute_s - p.load_s) <= 16e-3 + 1e-9   # they meet within one block


def test_mixed_tiers_recompute_the_slow_front():
    tiers = ["SSD"] * 8 + ["DRAM"] * 8
    p = plan_recompute(tiers, 16, BB, {"SSD": 50 * MB, "DRAM": 20e9}, prof(c1=1e-4))
    assert p.load_blocks_from == 8     # recompute exactly the SSD part, load the DRAM part


def test_quadratic_attention_makes_later_tokens_dearer():
    lin = plan_recompute(["SSD"] * 64, 16, BB, {"SSD": BB / 8e-3}, prof(c1=5e-4))
    quad = plan_recompute(["SSD"] * 64, 16, BB, {"SSD": BB / 8e-3}, prof(c1=5e-4, c2=1e-6))
    assert quad.recompute_tokens < lin.recompute_tokens


@given(st.integers(1, 200), st.floats(1e6, 1e11), st.floats(1e-6, 1e-2), st.floats(0, 1e-6),
       st.floats(0, 0.01))
def test_plan_never_worse_than_either_extreme(n, bw, c1, c2, lat):
    p = plan_recompute(["SSD"] * n, 16, BB, {"SSD": bw}, PrefillProfile(0, c1, c2), lat)
    assert p.predicted_s <= p.load_all_s + 1e-12
    assert p.predicted_s <= p.recompute_all_s + 1e-12
    assert 0 <= p.recompute_tokens <= n * 16 and p.recompute_tokens % 16 == 0


def test_profile_fit_recovers_coefficients():
    true = PrefillProfile(0.01, 2e-3, 3e-7)
    samples = [(t, true.seconds(t)) for t in (64, 256, 512, 1024, 2048)]
    f = PrefillProfile.fit(samples)
    for t in (100, 1000, 3000):
        assert f.seconds(t) == pytest.approx(true.seconds(t), rel=1e-6)
    assert PrefillProfile.fit([(100, 0.1)]).c1 == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        PrefillProfile.fit([])
    assert not math.isnan(f.c2)
