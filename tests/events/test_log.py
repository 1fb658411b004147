"""In process: the block table reports each tier change of a visible block exactly once to its
EventLog (a freed block's removal is not reported again when its tiers forget it), the log is
bounded and counts what it drops, and the configuration rejects bad endpoints."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kvstore.core.layout import KVLayout
from kvstore.daemon.config import ConfigError, load_config
from kvstore.events.log import CLEARED, REMOVED, STORED, STORED_ONE, EventLog
from kvstore.store.table import NO_SLOT, BlockTable

L = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=32)


def _ns(index: int, tenant: str = ""):
    return SimpleNamespace(index=index, namespace_id=bytes([index]) * 16, tenant=tenant, layout=L)


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _changes(log: EventLog) -> list[tuple]:
    """(kind, medium, [key ints], [parent key int or None]) of every record taken; one block's
    records (tuples) read as one-block records."""
    def num(b):
        return int.from_bytes(b, "little")
    out = []
    for r in log.take(1000):
        if type(r) is tuple:
            kind, medium, _ns, key, parent = r
            kind = STORED if kind == STORED_ONE else REMOVED
            out.append((kind, medium, [num(key)],
                        [None if parent is None else num(parent)] if kind == STORED else None))
            continue
        keys = [num(k.tobytes()) for k in (r.keys if r.keys is not None else [])]
        parents = None
        if r.kind == STORED:
            parents = [num(p.tobytes()) if h else None for p, h in zip(r.parents, r.has_parent)]
        out.append((r.kind, r.medium, keys, parents))
    return out


def _table(log: EventLog) -> BlockTable:
    forgotten = []
    t = BlockTable(events=log, on_free=lambda bid: t.clear_ssd(bid) or forgotten.append(bid))
    t.add_namespace(_ns(0))
    return t


def test_each_tier_change_of_a_visible_block_is_reported_once():
    log = EventLog()
    t = _table(log)
    a = t.add(0, _key(1), -1, t.tick(), dram=0)
    b = t.add(0, _key(2), a, t.tick(), dram=4096)
    assert _changes(log) == []                      # WRITING blocks are invisible
    t.publish([a, b])
    assert _changes(log) == [(STORED, "CPU", [1, 2], [None, 1])]
    t.set_ssd(a, 7, 99)
    t.set_ssd(a, 8, 99)                             # a new address, the same copy
    t.set_dram(a, NO_SLOT)                          # demoted
    t.set_dram(a, 8192)                             # promoted back
    t.set_dram(a, 12288)                            # moved within DRAM: no change of tier
    assert _changes(log) == [(STORED, "STORAGE", [1], [None]), (REMOVED, "CPU", [1], None),
                             (STORED, "CPU", [1], [None])]
    t.pin([a])
    assert t.discard(a)                             # deleted while leased: invisible now
    assert _changes(log) == [(REMOVED, "CPU", [1], None), (REMOVED, "STORAGE", [1], None)]
    t.unpin([a])                                    # freed now: nothing more to report
    t.set_ssd(b, 9, 1)
    t.free(b)             # evicted: its tiers forget it (clear_ssd) after it was reported
    # its parent is gone (freed): announced as a root rather than under a recycled id
    assert _changes(log) == [(STORED, "STORAGE", [2], [None]), (REMOVED, "CPU", [2], None),
                             (REMOVED, "STORAGE", [2], None)]


def test_recovered_blocks_are_stored_on_ssd_with_their_parents():
    log = EventLog()
    t = _table(log)
    keys = np.array([[1, 0], [2, 0]], dtype=np.uint64)
    parents = np.array([[0, 0], [1, 0]], dtype=np.uint64)
    t.restore_many(0, keys.tobytes(), np.array([0, 1]), np.array([5, 6], dtype=np.uint64),
                   np.array([0, 1]), parents)
    assert _changes(log) == [(STORED, "STORAGE", [1, 2], [None, 1])]
    snap = t.snapshot()
    assert [r.medium for r in snap] == ["CPU", "STORAGE"]
    assert len(snap[0].keys) == 0 and snap[1].keys.tolist() == keys.tolist()
    assert snap[1].has_parent.tolist() == [False, True]


def test_a_full_log_drops_and_counts_and_tenants_filter():
    log = EventLog(max_pending=2, tenants=("alice",))
    log.on_namespace(_ns(0, "alice"))
    log.on_namespace(_ns(1, "bob"))
    assert log.allowed_mask().tolist() == [True, False]
    assert log.block_tokens(1) == 32
    keys = np.zeros((3, 2), dtype=np.uint64)
    log.cleared()
    log.removed("CPU", np.zeros(3, dtype=np.uint32), keys)
    log.removed("CPU", np.zeros(3, dtype=np.uint32), keys)     # the third record: dropped
    assert (log.drops, log.dropped_events, log.pending()) == (1, 3, 2)
    assert [r.kind for r in log.take(10)] == [CLEARED, REMOVED]


@pytest.mark.parametrize("overrides, msg", [
    ({"kv_events_endpoint": "localhost:5557"}, "kv_events_endpoint: expected tcp://"),
    ({"kv_events_replay_endpoint": "tcp://127.0.0.1:5558"}, "needs kv_events_endpoint"),
])
def test_bad_event_endpoints_are_config_errors(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(env={}, overrides={"dram_bytes": "64MiB", **overrides})
