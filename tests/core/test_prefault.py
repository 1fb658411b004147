"""A client's arena mapping is prefaulted in bulk before the first copy through a slot
(client/transfer.py ArenaView.prefault): pages become mapped without a byte changing, a run
already populated is not populated again, and copies through prefaulted slots are byte-exact."""
from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore.core.arena import HEADER_BYTES, Arena, _madvise
from kvstore.client import transfer

pytestmark = pytest.mark.skipif(_madvise is None, reason="no libc madvise")

SLOT = 256 << 10


def _rss_kib(arena_path) -> int:
    """Resident KiB of this process's mappings of the arena file (pages in its page tables)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if not line[0].isupper() or ":" not in line.split()[0]:
                inside = line.rstrip().endswith(str(arena_path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.fixture
def attached(tmp_path):
    daemon = Arena.create(8 << 20, tmp_path, prepare_later=True)
    daemon.reserve(HEADER_BYTES, daemon.size_bytes - HEADER_BYTES)
    client = Arena.attach(daemon.path, daemon.uuid, daemon.size_bytes)
    try:
        yield daemon, client
    finally:
        client.close()
        daemon.close()


def test_prefault_maps_pages_without_changing_bytes(attached):
    daemon, client = attached
    assert client.mapped_bytes == 0          # nothing populated by the daemon yet
    pattern = np.arange(SLOT, dtype=np.uint64).view(np.uint8)[:SLOT]
    offsets = [HEADER_BYTES + i * SLOT for i in range(4)]
    np.frombuffer(daemon.buffer, np.uint8)[offsets[1]:offsets[1] + SLOT] = pattern
    calls = []

    def populate(offset, nbytes):
        calls.append((offset, nbytes))
        return client.populate(offset, nbytes)

    view = transfer.ArenaView(client.buffer, populate, client.mapped_bytes)
    before = _rss_kib(client.path)
    view.prefault(offsets, [1, 2], SLOT)          # slots 1 and 2: one adjacent run
    assert calls == [(offsets[1], 2 * SLOT)]
    assert _rss_kib(client.path) - before >= 2 * SLOT // 1024
    assert np.array_equal(view.np[offsets[1]:offsets[1] + SLOT], pattern)   # unchanged
    view.prefault(offsets, [1, 2], SLOT)          # already populated: no second call
    view.prefault(offsets, [2], SLOT)
    assert calls == [(offsets[1], 2 * SLOT)]
    view.prefault(offsets, [0, 1, 3], SLOT)       # only the runs with unmapped pages
    assert calls[1:] == [(offsets[0], 2 * SLOT), (offsets[3], SLOT)]
    view.prefault([-1, offsets[0]], [0, 1], SLOT)  # -1: nothing to write, skipped
    assert len(calls) == 3

    rows = np.random.default_rng(1).integers(0, 256, (4, SLOT), dtype=np.uint8)
    transfer.copy_runs(rows, view.np, offsets, [0, 1, 2, 3], SLOT, to_arena=True)
    got = np.empty_like(rows)
    transfer.copy_runs(got, np.frombuffer(daemon.buffer, np.uint8), offsets, [0, 1, 2, 3],
                       SLOT, to_arena=False)
    assert np.array_equal(got, rows)


def test_prefault_gives_up_quietly_where_the_kernel_cannot(attached):
    _, client = attached
    view = transfer.ArenaView(client.buffer, lambda o, n: False, 0)
    view.prefault([HEADER_BYTES], [0], SLOT)      # refused: pages fault in on first use
    view.np[HEADER_BYTES:HEADER_BYTES + SLOT] = 7
    assert int(view.np[HEADER_BYTES + SLOT - 1]) == 7
    view.prefault([HEADER_BYTES], [0], SLOT)      # no further attempts, no error


def test_a_fully_populated_mapping_is_not_prefaulted(attached):
    daemon, client = attached
    calls = []
    view = transfer.ArenaView(client.buffer, lambda o, n: calls.append(o) or True,
                              client.size_bytes)
    view.prefault([HEADER_BYTES], [0], SLOT)
    assert calls == []


def test_follow_populates_what_the_daemon_populated_and_stops(attached):
    daemon, client = attached
    half = HEADER_BYTES + (4 << 20)
    daemon.populate(0, half)
    daemon.mark_populated(half)
    view = transfer.ArenaView(client.buffer, client.populate, client.mapped_bytes)
    before = _rss_kib(client.path)
    view.follow(client.populated_bytes, piece_bytes=1 << 20, poll_s=0.01)
    try:
        deadline = time.monotonic() + 10
        while _rss_kib(client.path) - before < (half >> 10) - 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        grown = _rss_kib(client.path) - before
        assert grown >= (half >> 10) - 4          # up to the daemon's mark, nothing copied
        time.sleep(0.1)
        assert _rss_kib(client.path) - before <= (half >> 10) + 4   # and not beyond it
        daemon.populate(half, daemon.size_bytes - half)
        daemon.mark_populated(daemon.size_bytes)
        while _rss_kib(client.path) - before < (daemon.size_bytes >> 10) - 8 and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        assert _rss_kib(client.path) - before >= (daemon.size_bytes >> 10) - 8
    finally:
        view.close()
    assert view._follower is None
    # the bytes were not touched by populating
    assert not np.frombuffer(client.buffer, np.uint8)[HEADER_BYTES:].any()
    calls = []
    view._populate = lambda o, n: calls.append(o) or True
    view.prefault([HEADER_BYTES], [0], SLOT)      # already mapped by the follower
    assert calls == []
