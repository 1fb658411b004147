"""Layer-wise loads (kvstore.client.layerwise): the loader thread scatters layer by layer, a
wait returns once its layer is in the pages, finish reports a forward that did not wait."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kvstore.client.layerwise import LayerLoad, Loader
from kvstore.core.layout import KVLayout
from kvstore.kernels.pages import PageFormat, page_format_for

LAYOUT = KVLayout(num_layers=6, num_kv_heads=4, head_dim=64, block_tokens=64, dtype="bfloat16")
PAGES = 12


def _cache(fmt: PageFormat):
    raw = [torch.zeros(PAGES, LAYOUT.num_kv_heads, LAYOUT.block_tokens, 2 * LAYOUT.head_dim,
                       dtype=torch.bfloat16) for _ in range(LAYOUT.num_layers)]
    return raw, [fmt.canonical(r) for r in raw]


def _blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *LAYOUT.block_shape), generator=g).bfloat16()


@pytest.fixture
def loader():
    ld = Loader()
    yield ld
    ld.close()


def test_each_wait_sees_its_layer_loaded_and_finish_proves_all(loader):
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    raw, kv = _cache(fmt)
    a, b = _blocks(3, 1), _blocks(2, 2)
    job = LayerLoad(fmt, kv, [([4, 5, 6], a), ([0, 9], b)])
    assert job.num_blocks == 5
    loader.submit(job)
    for l in range(LAYOUT.num_layers):
        job.wait(l)
        # layer l is complete the moment its wait returns (later layers may still be moving)
        one = fmt.gather([kv[l]], [4, 5, 6, 0, 9])
        assert torch.equal(one[:, 0], torch.cat([a, b])[:, l])
    assert job.finish() is True and job.error is None
    assert torch.equal(fmt.gather(kv, [4, 5, 6, 0, 9]), torch.cat([a, b]))
    assert not fmt.gather(kv, [1, 2, 3, 7, 8, 10, 11]).any()


def test_a_layer_not_waited_for_fails_the_job(loader):
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    _raw, kv = _cache(fmt)
    job = LayerLoad(fmt, kv, [([1, 2], _blocks(2, 3))])
    loader.submit(job)
    for l in range(LAYOUT.num_layers):
        if l != 3:
            job.wait(l)
    assert job.finish() is False and job.unwaited_layers == 1 and job.error is None


def test_a_failed_scatter_ends_the_waits_and_fails_the_job(loader):
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    _raw, kv = _cache(fmt)
    job = LayerLoad(fmt, kv, [([1, 1], _blocks(2, 4))])   # a page twice: refused
    loader.submit(job)
    for l in range(LAYOUT.num_layers):
        job.wait(l)                                     # returns: the job ended
    assert job.finish() is False and isinstance(job.error, ValueError)
    assert not fmt.gather(kv, list(range(PAGES))).any()


def test_a_wait_scatters_a_layer_the_loader_has_not_started():
    """No loader thread ever runs this job: every wait scatters its own layer on the waiting
    thread (the forward never waits for a thread that is not running), in order, exactly."""
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    _raw, kv = _cache(fmt)
    a = _blocks(3, 6)
    job = LayerLoad(fmt, kv, [([2, 8, 5], a)])
    for l in range(LAYOUT.num_layers):
        job.wait(l)
        assert torch.equal(fmt.gather([kv[l]], [2, 8, 5])[:, 0], a[:, l])
        if l + 1 < LAYOUT.num_layers:       # nothing ahead of the forward is moved early
            assert not fmt.gather([kv[l + 1]], [2, 8, 5]).any()
    assert job.stolen == LAYOUT.num_layers
    assert job.finish() is True
    assert torch.equal(fmt.gather(kv, [2, 8, 5]), a)
    job.run()                                # a loader reaching it afterwards finds nothing
    assert torch.equal(fmt.gather(kv, [2, 8, 5]), a) and job.finish() is True


def test_finish_moves_what_nobody_claimed_and_reports_the_skipped_wait():
    """A forward that skipped layer 3's wait: finish scatters the rest itself (no copy runs
    after it returns) and fails the job."""
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    _raw, kv = _cache(fmt)
    a = _blocks(2, 7)
    job = LayerLoad(fmt, kv, [([6, 1], a)])
    for l in range(3):
        job.wait(l)
    assert job.finish() is False and job.unwaited_layers == LAYOUT.num_layers - 3
    assert torch.equal(fmt.gather(kv, [6, 1]), a)


def test_inline_job_needs_no_waits(loader):
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    _raw, kv = _cache(fmt)
    a = _blocks(2, 5)
    job = LayerLoad(fmt, kv, [([7, 3], a)])
    job.run_inline()
    assert job.finish() is True
    assert torch.equal(fmt.gather(kv, [7, 3]), a)


def test_this_thread_keeps_running_while_the_loader_moves_jobs(loader):
    """While the loader moves jobs back to back, a pure-Python loop on this thread keeps
    running (the engine thread runs the forward meanwhile), and every job lands."""
    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=64, block_tokens=128,
                      dtype="bfloat16")
    fmt = page_format_for("CPU_ATTN", layout)
    raw = [torch.zeros(64, 8, 128, 128, dtype=torch.bfloat16) for _ in range(4)]
    kv = [fmt.canonical(r) for r in raw]
    data = torch.ones((32, *layout.block_shape), dtype=torch.bfloat16)
    seen: list[float] = []
    stop = threading.Event()

    def jobs():
        while not stop.is_set():
            job = LayerLoad(fmt, kv, [(list(range(0, 64, 2)), data)])   # 32 single pages
            loader.submit(job)
            job.finish()
    mover = threading.Thread(target=jobs)
    mover.start()
    try:
        end = time.monotonic() + 1.0
        last = time.monotonic()
        gap = 0.0
        while time.monotonic() < end:
            now = time.monotonic()
            gap = max(gap, now - last)
            last = now
            seen.append(now)
    finally:
        stop.set()
        mover.join()
    # the loop never stopped for long: generous, the machine may be busy
    assert len(seen) > 1000 and gap < 0.5
    assert raw[0][0].eq(1).all() and raw[3][62].eq(1).all() and not raw[0][1].any()


def test_a_segment_still_arriving_is_scattered_only_once_its_layer_is_ready(loader):
    """A layer-wise get's segment (a third item, ready): layer l of it is scattered only after
    ready(l) returned — here the bytes of each layer are written into the source just before
    ready lets it go, so a scatter that ran early would copy zeros."""
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    _raw, kv = _cache(fmt)
    want = _blocks(2, 5)
    src = torch.zeros_like(want)                       # the arena slots, filled layer by layer
    arrived = [threading.Event() for _ in range(LAYOUT.num_layers)]
    asked = []

    def ready(l):
        asked.append(l)
        assert arrived[l].wait(10)

    job = LayerLoad(fmt, kv, [([2, 7], src, ready), ([5], _blocks(1, 6))])
    loader.submit(job)
    for l in range(LAYOUT.num_layers):
        time.sleep(0.01)
        src[:, l] = want[:, l]                         # layer l lands ...
        arrived[l].set()                               # ... and is said to be in place
        job.wait(l)
        assert torch.equal(fmt.gather([kv[l]], [2, 7])[:, 0], want[:, l])
    assert job.finish() is True and job.error is None
    assert torch.equal(fmt.gather(kv, [2, 7]), want)
    assert sorted(set(asked)) == list(range(LAYOUT.num_layers))


def test_a_segment_whose_layers_never_arrive_fails_the_job(loader):
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    _raw, kv = _cache(fmt)

    def ready(l):
        if l == 2:
            raise ConnectionError("stream broke")

    job = LayerLoad(fmt, kv, [([1], _blocks(1, 7), ready)])
    loader.submit(job)
    for l in range(LAYOUT.num_layers):
        job.wait(l)
    assert job.finish() is False and isinstance(job.error, ConnectionError)
    # run_inline waits for the last layer of every arriving segment, once, before scattering
    seen = []
    inline = LayerLoad(fmt, kv, [([3], _blocks(1, 8), seen.append)])
    inline.run_inline()
    assert seen == [LAYOUT.num_layers - 1] and inline.finish() is True
