"""DynamoIndex in process, on events built by hand: tiers counted once per block, blocks that
arrive before their parent wait for it, and a block leaves the tree with its last tier."""
from __future__ import annotations

import pytest

pytest.importorskip("dynamo.llm", reason="ai-dynamo-runtime (the test extra) is not installed")

from kvstore.events import wire  # noqa: E402
from kvstore.events.dynamo import DynamoIndex, hashes_of_keys  # noqa: E402

K = [bytes([i]) * 16 for i in range(1, 7)]          # a chain K0 <- K1 <- ... <- K5
H = hashes_of_keys(K)


def stored(medium, keys, parent=None):
    return wire.BlockStored(block_hashes=list(keys), parent_block_hash=parent, token_ids=[],
                            block_size=16, lora_id=None, medium=medium, lora_name=None)


def removed(medium, keys):
    return wire.BlockRemoved(block_hashes=list(keys), medium=medium)


def test_a_child_before_its_parent_waits_and_tiers_count_once():
    idx = DynamoIndex()
    # a snapshot's order: DRAM first (K3..K5, whose parent K2 is on SSD only), then SSD
    idx.apply_event(0, stored("CPU", K[3:], parent=K[2]))
    assert idx.find_matches(H) == {} and idx.orphans == 3
    idx.apply_event(0, stored("STORAGE", K[:4]))
    assert idx.orphans == 0
    assert idx.find_matches(H) == {0: 6}
    assert idx.find_matches_by_tier(H) == {0: {"CPU": 3, "STORAGE": 4}}
    # K3 leaves DRAM but stays on SSD: still matched; K5 leaves its only tier: the overlap ends
    idx.apply_event(0, removed("CPU", [K[3], K[5]]))
    assert idx.find_matches(H) == {0: 5}
    assert idx.find_matches_by_tier(H) == {0: {"CPU": 1, "STORAGE": 4}}
    idx.apply_event(1, stored("CPU", K[:2]))
    assert idx.find_matches(H) == {0: 5, 1: 2}
    idx.apply_event(0, wire.AllBlocksCleared())
    assert idx.find_matches(H) == {1: 2} and idx.blocks(0) == 0
    assert idx.rejected == 0
