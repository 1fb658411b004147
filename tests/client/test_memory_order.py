"""On a machine without total store order (aarch64: Grace Hopper) the SDK's lock-free checks —
slot generations after a lease-free copy, bucket versions of a snapshot lookup — are unsound, so
the SDK turns both off and every get goes through Acquire/Release (kvstore/core/memorder.py).
The machine is overridden with KVSTORE_MACHINE; a real daemon and a real client show the
fallback taken and the bytes still exact."""
from __future__ import annotations

import logging

import pytest

from kvstore.client import KVClient
from kvstore.core import memorder
from support.ssd import LAYOUT, SMALL_DRAM, chain, get_exact, put_chain


@pytest.mark.parametrize("machine,sound", [("x86_64", True), ("AMD64", True),
                                           ("aarch64", False), ("arm64", False),
                                           ("ppc64le", False)])
def test_which_machines_keep_the_lock_free_checks(monkeypatch, machine, sound):
    monkeypatch.setenv(memorder.ENV, machine)
    assert memorder.machine() == machine
    assert (memorder.lock_free_reads_unsound() is None) == sound


def test_platform_machine_decides_without_the_override(monkeypatch):
    monkeypatch.delenv(memorder.ENV, raising=False)
    monkeypatch.setattr(memorder.platform, "machine", lambda: "aarch64")
    assert "aarch64" in memorder.lock_free_reads_unsound()


def _run(d, tag: str):
    with KVClient(d.socket) as c:
        ns = c.namespace(f"mo-{tag}", LAYOUT)
        keys, data = put_chain(ns, 11, 12)
        before = c.stats()
        for _ in range(3):
            assert ns.lookup(keys).num_cached == 12
            assert get_exact(ns, keys, data) == 12
        # a partial hit: the prefix exact, the rest a miss
        tokens, _ = chain(12, 4)
        assert get_exact(ns, keys[:5] + ns.block_keys(tokens), data[:5]) == 5
        after = c.stats()
        dram0, dram1 = before.tier("DRAM"), after.tier("DRAM")
        return (ns.local_gets_answered, ns.local_lookups_answered,
                after.reads_reported - before.reads_reported, dram1.hits - dram0.hits,
                dram1.get_latency.count - dram0.get_latency.count, c.datapath.generations)


def test_without_tso_every_get_takes_a_lease_and_stays_exact(daemon_factory, monkeypatch, caplog):
    d = daemon_factory(*SMALL_DRAM)
    monkeypatch.setenv(memorder.ENV, "x86_64")          # the control: lease-free
    local_gets, local_lookups, reported, hits, _, gens = _run(d, "tso")
    assert (local_gets, local_lookups, reported, hits) == (4, 3, 41, 41)
    assert gens is not None

    monkeypatch.setenv(memorder.ENV, "aarch64")
    with caplog.at_level(logging.INFO, logger="kvstore.client"):
        local_gets, local_lookups, reported, hits, acquires, gens = _run(d, "arm")
    assert (local_gets, local_lookups, reported) == (0, 0, 0)
    assert hits == 41 and acquires == 4                  # four gets, each acquired + released
    assert gens is None
    assert any("not x86" in r.getMessage() for r in caplog.records)
