"""`kvstore bench trace`: the ideal caches on hand-made traces (exact values worked out by hand,
and Belady against a brute-force optimum), keys identical across processes, and replays through
the real CLI on real daemons — a hand-made trace whose answer is known, and a slice of the real
trace (skipped when the trace file is absent)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvstore.bench.trace.ideal import belady_hits, infinite_hits, lru_hits
from kvstore.bench.trace.routing import KVAwareRouter, RoundRobin
from kvstore.bench.trace.workload import (block_bytes_of, block_token_ids, parse_records,
                                          trace_layout)
from kvstore.core.keys import chain_keys, namespace_digest

REPO = Path(__file__).resolve().parents[2]
# CI keeps the trace beside the checkout; KVSTORE_TRACE names another copy
TRACE = Path(os.environ.get("KVSTORE_TRACE",
                            REPO.parent / "shared" / "traces" / "conversation_trace.jsonl"))
LAYOUT = trace_layout(4096)

# Hand-made: blocks A=10, B=11, C=12, D=13 (hash ids); 9 block references.
#   infinite: r1 A, r2 A B, r4 A C                                  -> 5
#   LRU, 2 blocks: r1 A (C evicts B), r2 A (B evicts C), r4 A       -> 3
#   Belady, 2 blocks: r1 A (C not admitted: used farthest), r2 A B,
#                     r3 D replaces B (neither used again; B deeper), r4 A  -> 4
#   3 blocks: LRU 4 (D evicts C before r4), Belady 5 (= infinite)
HAND = [[10, 11], [10, 12], [10, 11], [13], [10, 12]]


def _records(chains, step_ms=1000):
    return [{"timestamp": i * step_ms, "input_length": 512 * len(c), "output_length": 1,
             "hash_ids": c} for i, c in enumerate(chains)]


def _chains(hash_chains):
    return parse_records(_records(hash_chains), LAYOUT).chains()


def test_ideal_caches_on_a_hand_made_trace():
    chains = _chains(HAND)
    assert sum(map(len, chains)) == 9
    assert infinite_hits(chains) == 5
    assert (lru_hits(chains, 2), belady_hits(chains, 2)) == (3, 4)
    assert (lru_hits(chains, 3), belady_hits(chains, 3)) == (4, 5)
    assert belady_hits(chains, 0) == lru_hits(chains, 0) == 0


def _brute_force_optimum(chains, capacity: int) -> int:
    """The most prefix hits any cache of ``capacity`` blocks can serve: after each request the
    cache may be any subset (of at most ``capacity``) of what it held and the request's blocks."""
    best = {frozenset(): 0}
    for c in chains:
        c = c.tolist()
        nxt: dict[frozenset, int] = {}
        for cache, hits in best.items():
            k = 0
            while k < len(c) and c[k] in cache:
                k += 1
            pool = sorted(cache | set(c))
            for n in range(min(capacity, len(pool)) + 1):
                for keep in itertools.combinations(pool, n):
                    s = frozenset(keep)
                    if nxt.get(s, -1) < hits + k:
                        nxt[s] = hits + k
        best = nxt
    return max(best.values())


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_the_optimum_of_prefix_caches(seed):
    """On small random conversation-like traces (a shared root, sessions that grow), Belady
    serves exactly what the best possible cache serves, and LRU no more."""
    rng = np.random.default_rng(seed)
    sessions: list[list[int]] = []
    chains, next_id = [], 1
    for _ in range(7):
        if sessions and rng.random() < 0.6:
            s = sessions[rng.integers(len(sessions))]
        else:
            s = [0]
            sessions.append(s)
        for _ in range(int(rng.integers(0, 3))):
            s.append(next_id)
            next_id += 1
        chains.append(list(s))
    dense = _chains(chains)
    for cap in (1, 2, 3):
        opt = _brute_force_optimum(dense, cap)
        assert belady_hits(dense, cap) == opt, (chains, cap)
        assert lru_hits(dense, cap) <= opt <= infinite_hits(dense)


def test_keys_are_the_sdks_and_the_same_in_another_process():
    trace = parse_records(_records(HAND), LAYOUT)
    ns = namespace_digest("bench-trace", LAYOUT)
    want = chain_keys(ns, np.concatenate([block_token_ids(10), block_token_ids(12)]), 512)
    assert [trace.keys[b] for b in trace.requests[1].blocks] == want
    assert block_token_ids([10, 12]).reshape(-1).tolist() == want_tokens()
    code = ("from kvstore.bench.trace.workload import parse_records, trace_layout;"
            f"t = parse_records({_records(HAND)!r}, trace_layout(4096));"
            "print(' '.join(k.hex() for k in t.keys))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=60).stdout.split()
    assert other == [k.hex() for k in trace.keys]
    rows = block_bytes_of(trace.keys[:2], 4096)
    assert rows.shape == (2, 4096) and bytes(rows[1, 16:32]) == trace.keys[1]


def want_tokens():
    return np.concatenate([block_token_ids(10), block_token_ids(12)]).tolist()


class _FixedIndex:
    def __init__(self, overlaps):
        self.answer = overlaps

    def overlaps(self, keys, hash_ids):
        return list(self.answer)


def test_kv_aware_router_takes_the_longest_prefix_within_the_load_bound():
    rr = RoundRobin(3)
    assert [rr.pick([], []) for _ in range(4)] == [0, 1, 2, 0]
    index = _FixedIndex([5, 1, 0])
    router = KVAwareRouter(3, index, load_bound=1.2, window=6)
    picks = [router.pick([], []) for _ in range(6)]
    # host 0 holds the longest prefix, until its recent share passes 1.2x the mean; then the
    # next best (host 1), then the least loaded (host 2, overlap 0)
    assert picks[0] == 0 and picks.count(0) == 3
    assert sorted(picks) == [0, 0, 0, 1, 1, 2]
    index.answer = [0, 0, 0]       # a tie: the least loaded recently
    assert router.pick([], []) == 2


def _bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", "trace", "--quiet", "--json",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_replay_of_a_hand_made_trace_serves_what_an_infinite_cache_does(tmp_path):
    """A DRAM tier larger than the trace: nothing is evicted, so the daemon must serve exactly
    the infinite cache's 5 of 9 blocks, all from DRAM, every byte right."""
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(HAND)))
    r = _bench("--trace", str(path), "--dram-tokens", str(64 * 512))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["infinite_hit_ratio"] == pytest.approx(5 / 9)
    assert res["hit_ratio"] == pytest.approx(5 / 9)
    assert res["served_fraction"]["DRAM"] == pytest.approx(5 / 9)
    assert res["wrong_bytes"] == 0 and res["errors"] == 0
    assert res["requests_per_host"] == [5]
    assert res["replay_speed_x"] > 0       # 4 s of trace time


needs_trace = pytest.mark.skipif(not TRACE.exists(),
                                 reason=f"the production trace is not at {TRACE} "
                                        "(see ../shared/traces/README.md for its source)")


@needs_trace
def test_replay_of_the_real_trace_slice_on_one_host():
    r = _bench("--trace", str(TRACE), "--limit", "300", "--dram-tokens", str(1024 * 512))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    for key in ("hit_ratio", "infinite_hit_ratio", "belady_hit_ratio", "lru_hit_ratio",
                "replay_speed_x"):
        assert isinstance(res[key], float), key
    assert res["requests"] == 300 and res["wrong_bytes"] == 0 and res["errors"] == 0
    assert 0 < res["lru_hit_ratio"] <= res["belady_hit_ratio"] <= res["infinite_hit_ratio"]
    assert 0 < res["hit_ratio"] <= res["infinite_hit_ratio"]
    assert res["served_fraction"]["DRAM"] == pytest.approx(res["hit_ratio"])
    assert res["recomputed_fraction"] == pytest.approx(1 - res["hit_ratio"])


@needs_trace
def test_replay_on_two_hosts_routes_both_ways_and_against_one_shared_cache():
    pytest.importorskip("dynamo.llm", reason="ai-dynamo-runtime (Dynamo's KV router index)")
    pytest.importorskip("zmq", reason="pyzmq (the daemons' KV events)")
    # the trace's first 600 requests: enough returning conversations for routing to matter
    r = _bench("--trace", str(TRACE), "--limit", "600", "--hosts", "2",
               "--dram-tokens", str(1024 * 512))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert set(res["routes"]) == {"round-robin", "kv-aware"}
    assert res["wrong_bytes"] == 0 and res["errors"] == 0
    rr, kv = res["routes"]["round-robin"], res["routes"]["kv-aware"]
    assert rr["requests_per_host"] == [300, 300]
    assert sum(kv["requests_per_host"]) == 600 and res["load_max_over_mean"] <= 1.3
    assert kv["event_batches_applied"] > 0 and kv["routed_overlap_blocks"] > 0
    assert res["hit_ratio"] == kv["hit_ratio"]
    assert res["routing_gain"] == pytest.approx(kv["hit_ratio"] / rr["hit_ratio"])
    assert res["shared"]["requests_per_host"] == [600]
    assert res["shared_cache_hit_ratio"] == res["shared"]["hit_ratio"]
    # one cache of 2048 blocks: the ideal caches are computed at that capacity
    assert res["capacity_blocks"] == 2048
    for run in (rr, kv, res["shared"]):
        assert 0 < run["hit_ratio"] <= res["infinite_hit_ratio"]
    # the router routes on what the hosts hold: it must beat blind routing here
    assert kv["hit_ratio"] > rr["hit_ratio"]


@needs_trace
@pytest.mark.slow
def test_replay_with_a_cluster_tier_serves_from_remote():
    from kvstore.bench.cluster_engines import skip_reason
    reason = skip_reason("redis")
    if reason:
        pytest.skip(reason)
    r = _bench("--trace", str(TRACE), "--limit", "200", "--hosts", "2", "--route",
               "round-robin", "--no-shared", "--dram-tokens", str(256 * 512), "--remote", "redis")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["wrong_bytes"] == 0
    # round robin sends a conversation's next turn to the other host: its prefix comes from
    # the cluster tier
    assert res["served_fraction"]["REMOTE"] > 0
    assert res["hit_ratio"] <= res["infinite_hit_ratio"]


def test_an_ssd_tier_larger_than_the_free_disk_is_refused_before_any_daemon(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(HAND)))
    r = _bench("--trace", str(path), "--dir", str(tmp_path), "--ssd-tokens", str(10**15),
               timeout=60)
    assert r.returncode != 0 and "GB free" in r.stderr
    assert not list(tmp_path.glob("kvstore-bench-trace-*"))
