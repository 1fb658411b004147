"""The prefix-load decision (vLLM's direction): block tiers + bandwidths + prefill profile ->
how many leading blocks of a hit to load."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.planner.prefix_load import plan_prefix_load
from kvstore.planner.recompute import PrefillProfile

MB = 1e6
BB = 2 * 1024 * 1024   # 2 MiB blocks of 128 tokens
BT = 128


def prof(c1=1e-4, c2=0.0):
    return PrefillProfile(0.0, c1, c2)


def test_nothing_cached():
    p = plan_prefix_load([], BT, BB, {"SSD": 100 * MB}, prof(), 0, 2080)
    assert (p.load_blocks, p.predicted_s) == (0, 0.0)


def test_fast_tier_loads_everything():
    p = plan_prefix_load(["DRAM"] * 16, BT, BB, {"DRAM": 10e9}, prof(), 0, 2080)
    assert p.load_blocks == 16
    assert p.predicted_s == pytest.approx(16 * BB / 10e9 + 32 * 1e-4)


def test_slow_tier_recomputes_everything():
    # loading a block takes 2 MiB / 10 MB/s = 210 ms, computing it 12.8 ms
    p = plan_prefix_load(["SSD"] * 16, BT, BB, {"SSD": 10 * MB}, prof(), 0, 2080)
    assert p.load_blocks == 0
    assert p.predicted_s == pytest.approx(p.recompute_all_s) == pytest.approx(2080 * 1e-4)


def test_dram_roots_load_and_the_slow_ssd_tail_is_computed():
    # the roots many prompts share stay in DRAM, the tail was demoted to a slow SSD
    tiers = ["DRAM"] * 6 + ["SSD"] * 10
    p = plan_prefix_load(tiers, BT, BB, {"DRAM": 10e9, "SSD": 50 * MB}, prof(), 0, 2080)
    assert p.load_blocks == 6
    assert p.predicted_s < 0.75 * min(p.load_all_s, p.recompute_all_s)


def test_unknown_or_zero_bandwidth_stops_the_load_there():
    tiers = ["DRAM"] * 4 + ["REMOTE"] * 4
    p = plan_prefix_load(tiers, BT, BB, {"DRAM": 10e9}, prof(c1=1.0), 0, 2080)
    assert p.load_blocks == 4 and math.isinf(p.load_all_s)
    p = plan_prefix_load(tiers, BT, BB, {"DRAM": 10e9, "REMOTE": 0.0}, PrefillProfile(), 0, 2080)
    assert p.load_blocks == 4      # unmeasured compute: load all that can load


def test_unmeasured_profile_loads_everything():
    p = plan_prefix_load(["SSD"] * 8, BT, BB, {"SSD": 1 * MB}, PrefillProfile(), 0, 2080)
    assert p.load_blocks == 8


def test_quadratic_attention_makes_late_blocks_dearer_to_compute():
    # what the engine already holds makes the hit's tokens dearer to compute (attention over
    # more positions): the same hit at the same bandwidth is loaded behind a long prefix
    bw = BB / 30e-3                     # 30 ms per block
    q = prof(c1=1e-4, c2=1e-7)          # marginal cost of token t: 1e-4 + 1e-7 * (2t + 1)
    early = plan_prefix_load(["SSD"] * 4, BT, BB, {"SSD": bw}, q, 0, 4 * BT + 16)
    late = plan_prefix_load(["SSD"] * 4, BT, BB, {"SSD": bw}, q, 64 * BT, 68 * BT + 16)
    assert early.load_blocks == 0 and late.load_blocks == 4


def test_a_forwards_fixed_cost_does_not_count_against_recompute():
    # every plan runs the suffix's forward: c0 is paid once whatever is loaded
    bw = BB / 20e-3                     # 20 ms per block, 12.8 ms to compute one
    p = plan_prefix_load(["SSD"] * 8, BT, BB, {"SSD": bw}, PrefillProfile(2.0, 1e-4, 0.0),
                         0, 8 * BT + 16)
    assert p.load_blocks == 0 and p.recompute_all_s == pytest.approx((8 * BT + 16) * 1e-4)


def test_latency_tips_a_small_load_to_recompute():
    args = (["SSD"] * 2, BT, BB, {"SSD": 1e9}, prof(), 0, 2 * BT + 16)
    assert plan_prefix_load(*args).load_blocks == 2
    assert plan_prefix_load(*args, latency_s=0.1).load_blocks == 0


@given(st.lists(st.sampled_from(["DRAM", "SSD", "REMOTE"]), max_size=40),
       st.floats(1e6, 1e10), st.floats(1e-6, 1e-2), st.floats(0, 1e-6),
       st.integers(0, 4), st.floats(0, 0.05))
def test_never_predicted_slower_than_either_extreme(tiers, ssd_bw, c1, c2, before, lat):
    bw = {"DRAM": 20e9, "SSD": ssd_bw, "REMOTE": ssd_bw / 3}
    n = len(tiers)
    p = plan_prefix_load(tiers, BT, BB, bw, PrefillProfile(0.0, c1, c2), before * BT,
                         (before + n) * BT + 16, lat)
    assert 0 <= p.load_blocks <= n
    assert p.predicted_s <= min(p.load_all_s, p.recompute_all_s) + 1e-9


def test_a_load_that_streams_layer_by_layer_overlaps_the_forward_at_the_crossover():
    # 16 SSD blocks; the SSD's bandwidth makes loading them all cost what computing them does
    compute_all = 2048 * 1e-4                       # c1 = 1e-4 s/token, 16 blocks of 128
    bw = 16 * BB / compute_all                       # load all = compute all (plus the suffix)
    tiers = ["SSD"] * 16
    serial = plan_prefix_load(tiers, BT, BB, {"SSD": bw}, prof(), 0, 2080)
    streamed = plan_prefix_load(tiers, BT, BB, {"SSD": bw}, prof(), 0, 2080, overlap_layers=16)
    # Added up, every split costs the same: no split beats the better extreme.
    assert serial.predicted_s == pytest.approx(min(serial.load_all_s, serial.recompute_all_s))
    # Streamed, load and compute overlap: about half of each, and the forward waits for the
    # loaded blocks' layers one at a time.
    assert 6 <= streamed.load_blocks <= 10
    assert streamed.predicted_s < 0.6 * min(serial.load_all_s, serial.recompute_all_s)
    j = streamed.load_blocks
    load_j = j * BB / bw
    compute_j = (2080 - j * BT) * 1e-4
    assert streamed.predicted_s == pytest.approx(max(load_j, compute_j) +
                                                 min(load_j, compute_j) / 16)
    # Nothing loaded: nothing to overlap (recompute all costs the same either way).
    assert streamed.recompute_all_s == serial.recompute_all_s
    # A fast tier still loads everything, streamed or not.
    fast = plan_prefix_load(["DRAM"] * 16, BT, BB, {"DRAM": 10e9}, prof(), 0, 2080,
                            overlap_layers=16)
    assert fast.load_blocks == 16
