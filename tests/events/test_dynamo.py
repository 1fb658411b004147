"""NVIDIA Dynamo's KV router index (ai-dynamo-runtime's RadixTree) fed with the events of
several real daemons: for a request whose prefix one daemon holds, find_matches names that
daemon with the right overlap, per tier; a router that starts late rebuilds from snapshots."""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("dynamo.llm", reason="ai-dynamo-runtime (the test extra) is not installed")

from kvstore.client import KVClient  # noqa: E402
from kvstore.events.dynamo import DynamoIndex, hashes_of_keys, request_hashes  # noqa: E402
from support.events import endpoints, event_args, truth  # noqa: E402
from support.ssd import LAYOUT, SMALL_DRAM, chain, put_chain, ssd_args  # noqa: E402


def _settle(index: DynamoIndex, until, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the index never reached the expected state"
        index.pump(0.05)


def test_find_matches_names_the_daemon_holding_the_prefix(daemon_factory, tmp_path):
    eps = [endpoints() for _ in range(3)]
    daemons = [daemon_factory(*SMALL_DRAM, *event_args(*eps[0])),
               daemon_factory(*SMALL_DRAM, *event_args(*eps[1])),
               daemon_factory(*ssd_args(tmp_path / "ssd", "32MiB"), *event_args(*eps[2]))]
    index = DynamoIndex()
    clients = [KVClient(d.socket) for d in daemons]
    try:
        for worker, (pub, replay) in enumerate(eps):
            index.add_daemon(worker, pub, replay)
        ns = [c.namespace("m", LAYOUT) for c in clients]
        tokens, data = chain(7, 10)                     # the request: 10 blocks + a tail
        request = list(tokens) + [1, 2, 3]
        keys = ns[0].block_keys(tokens)
        ns[1].put(keys[:6], data[:6]).result(timeout=60)   # daemon 1: 6 blocks of the prefix
        ns[2].put(keys[:2], data[:2]).result(timeout=60)   # daemon 2: the first 2
        put_chain(ns[0], 8, 5)                              # daemon 0: something else
        hashes = request_hashes(ns[0].namespace_id, request, LAYOUT.block_tokens)
        assert hashes == hashes_of_keys(keys)
        _settle(index, lambda: index.find_matches(hashes) == {1: 6, 2: 2})
        # the router's choice: the longest prefix
        scores = index.find_matches(hashes)
        assert max(scores, key=scores.get) == 1
        assert index.find_matches_by_tier(hashes) == {1: {"CPU": 6},
                                                     2: {"CPU": 2, "STORAGE": 2}}

        # daemon 2 demotes its 2 blocks to SSD under pressure: still a match, now on SSD only
        for seed in (20, 21, 22):
            put_chain(ns[2], seed, 100)
        want = truth(ns[2], keys[:2])
        assert want == {"CPU": set(), "STORAGE": set(keys[:2])}
        _settle(index, lambda: index.find_matches_by_tier(hashes).get(2) == {"STORAGE": 2})
        assert index.find_matches(hashes) == {1: 6, 2: 2}

        # daemon 1 drops the middle of its prefix: the overlap ends where its chain breaks
        ns[1].delete(keys[3:4])
        _settle(index, lambda: index.find_matches(hashes) == {1: 3, 2: 2})

        # a router that starts now learns the same from the daemons' snapshots alone
        late = DynamoIndex()
        try:
            for worker, (pub, replay) in enumerate(eps):
                late.add_daemon(worker, pub, replay)
            assert late.find_matches(hashes) == {1: 3, 2: 2}
            assert late.find_matches_by_tier(hashes) == index.find_matches_by_tier(hashes)
            assert late.rejected == 0 and late.orphans == 0
        finally:
            late.close()
        assert index.rejected == 0
    finally:
        index.close()
        for c in clients:
            c.close()


def test_another_namespace_never_matches(daemon_factory):
    pub, replay = endpoints()
    d = daemon_factory(*SMALL_DRAM, *event_args(pub, replay))
    index = DynamoIndex()
    try:
        index.add_daemon(0, pub, replay)
        with KVClient(d.socket) as client:
            a = client.namespace("model-a", LAYOUT)
            b = client.namespace("model-b", LAYOUT)
            tokens, data = chain(3, 4)
            a.put(a.block_keys(tokens), data).result(timeout=60)
            mine = request_hashes(a.namespace_id, tokens, LAYOUT.block_tokens)
            _settle(index, lambda: index.find_matches(mine) == {0: 4})
            # same tokens, another model: other keys, no match
            assert index.find_matches(request_hashes(b.namespace_id, tokens,
                                                     LAYOUT.block_tokens)) == {}
            assert index.blocks(0) == 4
            assert np.array_equal(np.asarray(a.get(a.block_keys(tokens)).result(timeout=60)),
                                  data)
    finally:
        index.close()
