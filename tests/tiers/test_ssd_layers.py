"""Layer-wise gets (Namespace.acquire_layers, the AcquireLayers RPC) through real daemon and
client processes: SSD blocks land in their DRAM slots layer by layer, every byte is the
block's, a block that fails its checksum ends the verified prefix, and a client that goes away
mid-stream leaves no lease behind."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from kvstore.client import KVClient
from kvstore.client.errors import FailedPrecondition, Reason
from support import SUPPORT
from support.ssd import LAYOUT, get_exact, on_ssd, payload_offset, put_chain, ssd_stats, tier

LB = LAYOUT.layer_bytes     # 8 KiB: two layers per 16 KiB block


def rows(lease) -> np.ndarray:
    return np.stack([np.asarray(v) for v in lease.views(like="numpy")])


def test_ssd_blocks_arrive_layer_by_layer_and_every_byte_is_the_blocks(daemon_factory, tmp_path):
    # 16 blocks x 8 KiB per layer at 400 kB/s: each layer takes about a third of a second
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path, extra=("--ssd-read-limit", "400kB/s"))
    flat = data.reshape(len(keys), -1)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert set(ns.lookup(keys).tiers) == {"SSD"}
        t0 = time.monotonic()
        lease = ns.acquire_layers(keys)
        answered_s = time.monotonic() - t0
        assert len(lease) == 16 and lease.tiers == ["SSD"] * 16 and lease.num_layers == 2
        assert lease.ready == 0 and min(lease.offsets) >= 0
        lease.wait_layer(0)
        first_layer_s = time.monotonic() - t0
        assert lease.ready == 1                     # one message per layer: this one said 1
        assert np.array_equal(rows(lease)[:, :LB], flat[:, :LB])    # layer 0 of every block
        lease.wait_layer(1)
        assert lease.finish() == 16
        all_s = time.monotonic() - t0
        assert np.array_equal(rows(lease), flat)
        lease.release()
        # The lease was answered before any byte was read, the first layer before the second.
        assert answered_s < first_layer_s < 0.8 * all_s and all_s > 0.3, (
            answered_s, first_layer_s, all_s)
        assert ns.lookup(keys).tiers == ["DRAM"] * 16            # promoted, as a get's are
        ssd = tier(ssd_stats(c), "SSD")
        assert (ssd.hits, ssd.promotions, ssd.checksum_failures) == (16, 16, 0)
        assert c.stats().proto.active_leases == 0
        assert get_exact(ns, keys, data) == 16


@pytest.mark.parametrize("uring", ["true", "false"])
def test_layer_wise_gets_at_disk_speed_are_byte_exact_through_the_ring_or_the_threads(
        daemon_factory, tmp_path, uring):
    """No read limit: the daemon queues every layer of every block at once on its io_uring
    (or, with --ssd-io-uring false, reads layer by layer in its I/O threads); either way
    every byte is the block's and every block verified."""
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path, extra=("--ssd-io-uring", uring))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        lease = ns.acquire_layers(keys)
        assert len(lease) == 16 and lease.num_layers == 2
        lease.wait_layer(1)
        assert lease.finish() == 16
        assert np.array_equal(rows(lease), data.reshape(len(keys), -1))
        lease.release()
        ssd = tier(ssd_stats(c), "SSD")
        assert (ssd.hits, ssd.promotions, ssd.checksum_failures) == (16, 16, 0)
        assert c.stats().proto.active_leases == 0


def test_blocks_already_in_dram_are_ready_at_once(daemon_factory):
    d = daemon_factory("--dram-bytes", "4MiB", "--chunk-bytes", "1MiB")
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 3, 4)
        lease = ns.acquire_layers(keys + ns.block_keys(list(range(16))))   # + one not stored
        assert len(lease) == 4 and lease.ready == lease.num_layers == 2
        lease.wait_layer(1)                         # returns without another message
        assert lease.finish() == 4
        assert np.array_equal(rows(lease), data.reshape(4, -1))
        lease.release(wait=True)
        assert len(ns.acquire_layers(ns.block_keys(list(range(100, 116))))) == 0


def test_a_block_that_fails_its_checksum_ends_the_verified_prefix(daemon_factory, tmp_path):
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path, n_blocks=4)
    d.stop()
    seg = tmp_path / "ssd" / "seg-00000.slab"
    at = payload_offset(2) + LB + 77                  # layer 1 of the third block
    with open(seg, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))
    d.start()
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        lease = ns.acquire_layers(keys)
        assert len(lease) == 4                      # told of all four: the bytes come later
        lease.wait_layer(1)
        assert lease.finish() == 2                  # the third block's bytes were wrong
        assert np.array_equal(rows(lease)[:2], data[:2].reshape(2, -1))
        lease.release()
        ssd = tier(ssd_stats(c), "SSD")
        assert ssd.checksum_failures == 1
        assert ns.lookup(keys).num_cached == 2      # dropped, never served
        assert get_exact(ns, keys, data) == 2
        assert c.stats().proto.active_leases == 0


_LEAVER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {support!r})
    from support.ssd import LAYOUT
    from kvstore.client import KVClient
    c = KVClient(sys.argv[1])
    ns = c.namespace("m", LAYOUT)
    keys = [bytes.fromhex(k) for k in sys.argv[2].split(",")]
    lease = ns.acquire_layers(keys)
    print(len(lease), lease.ready, flush=True)
    os._exit(0)                     # gone mid-stream: no release, no goodbye
""")


def test_a_client_gone_mid_stream_leaves_no_lease_behind(daemon_factory, tmp_path):
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path, extra=("--ssd-read-limit", "400kB/s"))
    out = subprocess.run([sys.executable, "-c", _LEAVER.format(support=str(SUPPORT.parent)),
                          d.socket, ",".join(k.hex() for k in keys)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["16", "0"], out.stderr
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        deadline = time.monotonic() + 20
        while c.stats().proto.active_leases:
            assert time.monotonic() < deadline, "the gone client's lease was never ended"
            time.sleep(0.1)
        assert get_exact(ns, keys, data) == 16          # the daemon serves on, bytes exact
        assert tier(ssd_stats(c), "SSD").checksum_failures == 0


def test_a_client_without_the_arena_is_told_to_use_get(daemon):
    with KVClient(daemon.socket, shared_memory=False) as c:
        ns = c.namespace("m", LAYOUT)
        with pytest.raises(FailedPrecondition, match="shared arena") as e:
            ns.acquire_layers(ns.block_keys(list(range(16))))
        assert e.value.reason == Reason.NOT_ENABLED
