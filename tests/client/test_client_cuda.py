"""The SDK's pinned-arena path: a no-op with a clear log line without CUDA, DMA with it."""
from __future__ import annotations

import logging

import pytest
import torch

from kvstore.client import KVClient, KVLayout
from kvstore.client import cuda as kvcuda

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16, dtype="float16")


def test_ready_event_is_none_for_cpu_tensors_and_numpy():
    import numpy as np
    assert kvcuda.ready_event(torch.zeros(4)) is None
    assert kvcuda.ready_event(np.zeros(4)) is None
    assert kvcuda.ready_event(None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_pinning_is_a_logged_no_op_without_cuda_and_the_cpu_path_is_unchanged(daemon, caplog):
    caplog.set_level(logging.INFO, logger="kvstore.client.cuda")
    with KVClient(daemon.socket, pin_arena=True) as client:
        assert client.shared_memory and client.datapath.pinned is None
        msgs = [r.getMessage() for r in caplog.records if r.name == "kvstore.client.cuda"]
        assert len(msgs) == 1 and "not pinning the kvstore arena" in msgs[0]
        assert ("CPU-only build" in msgs[0] or "no CUDA device" in msgs[0])
        assert caplog.records[-1].levelno == logging.WARNING      # asked for, so a warning
        ns = client.namespace("m", LAYOUT)
        kv = torch.randn(3, *LAYOUT.block_shape).half()
        keys = ns.block_keys(list(range(48)))
        assert ns.put(keys, kv).result(timeout=10) == 3
        assert torch.equal(ns.get(keys).result(timeout=10), kv)
    caplog.clear()
    with KVClient(daemon.socket, pin_arena=False) as client:
        assert client.datapath.pinned is None
    assert not [r for r in caplog.records if r.name == "kvstore.client.cuda"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_put_and_get_dma_through_the_pinned_arena(daemon):
    with KVClient(daemon.socket) as client:                # auto: this process uses CUDA
        assert client.datapath.pinned is not None
        assert client.datapath.arena_view.torch.is_pinned()
        ns = client.namespace("m", LAYOUT)
        keys = ns.block_keys(list(range(16 * 8)))
        kv = torch.randn(8, *LAYOUT.block_shape, device="cuda").half()
        kv_copy = kv.clone()
        assert ns.put(keys[:3], kv[:3]).result(timeout=30) == 3
        fut = ns.put(keys, kv * 1)            # produced on the compute stream; 3 already stored
        assert fut.result(timeout=30) == 5
        out = torch.zeros_like(kv)
        got = ns.get(keys, out=out).result(timeout=30)
        assert got.data_ptr() == out.data_ptr() and got.shape[0] == 8
        assert torch.equal(out, kv_copy)
        # a CPU get of the same blocks reads the same bytes the DMA wrote
        assert torch.equal(ns.get(keys).result(timeout=30), kv_copy.cpu())


def test_copies_are_grouped_into_runs_adjacent_in_both_places():
    bb = 4096
    offsets = [8192, 12288, 16384, 40960, -1, 45056, 4096]
    todo = [0, 1, 2, 3, 5, 6]                       # index 4: already stored, nothing to copy
    assert kvcuda.runs(offsets, todo, bb) == [(0, 3, 8192), (3, 1, 40960), (5, 1, 45056),
                                              (6, 1, 4096)]
    assert kvcuda.runs([0, 4096, 8192], [0, 1, 2], bb) == [(0, 3, 0)]
    assert kvcuda.runs([8192, 4096], [0, 1], bb) == [(0, 1, 8192), (1, 1, 4096)]   # descending
    assert kvcuda.runs([], [], bb) == []


def test_copy_pieces_cut_runs_at_registration_boundaries_and_move_every_byte():
    """The arena is pinned in chunks (kvstore.core.pinning): a run of slots that spans two
    registrations is copied in pieces, each inside one, and the pieces together move exactly
    the rows to their slots (replayed here with numpy in place of the CUDA copies)."""
    import numpy as np
    from kvstore.core.pinning import ChunkedRegistration
    bb, chunk = 4096, 16384
    reg = ChunkedRegistration(0, 0, lambda p, n: 0, lambda p: 0, chunk_bytes=chunk)
    offsets = [8192, 12288, 16384, 20480, -1, 40960, 0]
    todo = [0, 1, 2, 3, 5, 6]
    pieces = kvcuda.copy_pieces(offsets, todo, bb, reg.pieces)
    # The run of rows 0-3 (bytes 8192..24576) crosses the boundary at 16384: two pieces.
    assert pieces == [(0, 4, 0, 8192, 8192), (0, 4, 8192, 16384, 8192),
                      (5, 1, 0, 40960, 4096), (6, 1, 0, 0, 4096)]
    assert all(o // chunk == (o + n - 1) // chunk for *_, o, n in pieces)
    assert kvcuda.copy_pieces(offsets, todo, bb) == [
        (0, 4, 0, 8192, 16384), (5, 1, 0, 40960, 4096), (6, 1, 0, 0, 4096)]
    rows = np.random.default_rng(3).integers(0, 256, (len(offsets), bb), dtype=np.uint8)
    base = np.zeros(48 * 1024, dtype=np.uint8)
    for first, count, r, o, n in pieces:
        base[o:o + n] = rows[first:first + count].reshape(-1)[r:r + n]
    for i in todo:
        assert np.array_equal(base[offsets[i]:offsets[i] + bb], rows[i])
    back = np.zeros_like(rows)
    for first, count, r, o, n in pieces:
        back[first:first + count].reshape(-1)[r:r + n] = base[o:o + n]
    assert np.array_equal(back[todo], rows[todo]) and not back[4].any()
