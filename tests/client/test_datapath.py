"""The SDK's data paths (client/datapath/): the one chosen from what the daemon grants, and the
same bytes through each. Real daemon processes; the paths are only ever reached via KVClient."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvstore.client import KVClient, KVLayout
from kvstore.client.datapath.arena import ArenaPath
from kvstore.client.datapath.hbm import HBMPath
from kvstore.client.datapath.stream import StreamPath
from kvstore.client.link import Backoff

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16, dtype="float16")


def _blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *LAYOUT.block_shape), generator=g).half()


def test_the_path_follows_the_grant_and_the_bytes_are_the_same_on_every_path(daemon):
    with KVClient(daemon.socket) as local, KVClient(daemon.socket, shared_memory=False) as remote:
        assert type(local.datapath) is ArenaPath and local.shared_memory   # CPU torch: no pin
        assert local.datapath.generations is not None and local.arena is not None
        assert type(remote.datapath) is StreamPath and not remote.shared_memory
        assert remote.arena is None and remote.datapath.arena_view is None
        a, b = local.namespace("m", LAYOUT), remote.namespace("m", LAYOUT)
        kv1, kv2 = _blocks(5, 1), _blocks(5, 2)
        k1 = a.block_keys(list(range(5 * 16)))
        k2 = a.block_keys(list(range(1000, 1000 + 5 * 16)))
        assert a.put(k1, kv1).result() == 5           # memcpy into the arena
        assert b.put(k2, kv2).result() == 5           # WriteBlocks
        for ns in (a, b):
            assert torch.equal(ns.get(k1).result(), kv1)      # both ways, both paths
            assert torch.equal(ns.get(k2).result(), kv2)
        out = np.zeros((5, *LAYOUT.block_shape), dtype=np.float16)
        assert np.array_equal(b.get(k1, out=out).result(), kv1.numpy())   # numpy out, streamed
        # a miss in the middle cuts the prefix on every path
        gap = k1[:2] + a.block_keys(list(range(7000, 7016))) + k1[3:]
        assert len(a.get(gap).result()) == 2 and len(b.get(gap).result()) == 2


def test_zero_copy_views_need_the_arena(daemon):
    with KVClient(daemon.socket, shared_memory=False) as remote:
        ns = remote.namespace("m", LAYOUT)
        keys = ns.block_keys(list(range(32)))
        ns.put(keys, _blocks(2, 3)).result()
        with ns.acquire(keys) as lease:
            assert len(lease) == 2
            with pytest.raises(Exception, match="shared arena"):
                lease.views()


def test_the_hbm_pool_wraps_the_arena_path(daemon_factory):
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB",
                       "--hbm-bytes", "1MiB", "--hbm-device", "host")
    with KVClient(d.socket) as c, KVClient(d.socket, use_hbm=False) as plain:
        assert type(c.datapath) is HBMPath and type(c.datapath.inner) is ArenaPath
        assert c.datapath.pool is not None and c.datapath.pool.backend == "host"
        assert type(plain.datapath) is ArenaPath and plain.datapath.pool is None
        ns = c.namespace("m", LAYOUT)
        keys = ns.block_keys(list(range(48)))
        kv = _blocks(3, 4)
        ns.put(keys, kv).result()
        # a host pool's device is the CPU: gets into CPU tensors read (and fill) the pool
        for _ in range(2):
            out = torch.empty_like(kv)
            assert torch.equal(ns.get(keys, out=out).result(), kv)
        assert torch.equal(plain.namespace("m", LAYOUT).get(keys).result(), kv)
        assert np.array_equal(ns.get(keys, out=np.zeros_like(kv.numpy())).result(), kv.numpy())


def test_backoff_doubles_to_its_cap_and_a_success_resets_it():
    b = Backoff(0.05, max_s=0.15)
    assert not b.waiting()
    assert [b.failed() for _ in range(4)] == [0.05, 0.1, 0.15, 0.15]
    assert b.waiting()
    b.succeeded()
    assert not b.waiting() and b.failed() == 0.05
    time.sleep(0.06)
    assert not b.waiting()
    assert Backoff(0.0).failed() == 0.0 and not Backoff(0.0).waiting()
    assert Backoff(60.0).max_s == 60.0       # a first wait above the cap is kept
    many = Backoff(1.0)
    for _ in range(2000):                    # 2.0 ** 2000 would overflow a float
        many.failed()
    assert many.failed() == Backoff.MAX_S


@pytest.mark.parametrize("size", [8, 4096 + 3, 64 << 10, 256 << 10, (4 << 20) + 8])
def test_host_copies_are_exact_at_every_relative_alignment(size):
    # transfer._host_copy takes another loop where memcpy crawls ((dst - src) % 64 in 1..31,
    # e.g. a numpy output 16 bytes into its pages, read from a page-aligned arena slot): the
    # bytes must be the same whichever loop copies them, aligned or not, any length.
    from kvstore.client.transfer import copy_rows
    rng = np.random.default_rng(size)
    src_buf = rng.integers(0, 256, size + 128, dtype=np.uint8)
    for s_off in (0, 8, 16):
        for d_off in range(0, 64, 4):
            dst_buf = np.zeros(size + 128, dtype=np.uint8)
            src = src_buf[s_off:s_off + size]
            copy_rows(dst_buf[d_off:d_off + size], src)
            assert np.array_equal(dst_buf[d_off:d_off + size], src), (s_off, d_off)
            assert not dst_buf[:d_off].any() and not dst_buf[d_off + size:].any()


def test_a_torch_import_in_progress_is_not_a_crash(monkeypatch):
    """A client process that never imported torch imports it in an I/O thread for its first
    torch output; meanwhile the caller's next get checks its ``out`` against a torch module
    still being initialised, with no Tensor yet (seen: AttributeError from get)."""
    import sys
    import types

    from kvstore.client import cuda, transfer
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert cuda.is_cuda_tensor(np.zeros(4)) is False
    assert cuda.is_cuda_tensor(None) is False
    assert transfer._is_torch(np.zeros(4)) is False
    monkeypatch.undo()
    assert transfer._is_torch(torch.zeros(4)) is True
    assert cuda.is_cuda_tensor(torch.zeros(4)) is False
