"""The SSD tier in tests: a small layout, daemon flags for a small DRAM tier over an SSD tier,
and chains of blocks whose bytes derive from a seed, read back and compared byte for byte."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvstore.client import KVClient
from kvstore.core.layout import KVLayout

# 2 layers x 4 heads x 64 dims x 16 tokens x uint8 x (k, v) = 16 KiB per block
LAYOUT = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="uint8")
BB = LAYOUT.block_bytes
SMALL_DRAM = ("--dram-bytes", "4MiB", "--chunk-bytes", "1MiB")   # 256 blocks of 16 KiB


def ssd_args(ssd_dir: Path, size: str = "32MiB", *extra: str) -> list[str]:
    return [*SMALL_DRAM, "--ssd-dir", str(ssd_dir), "--ssd-bytes", size,
            "--ssd-segment-bytes", "8MiB", "--ssd-io-threads", "4", *extra]


def payload_offset(slot: int) -> int:
    """Where slot ``slot``'s block bytes start in a segment file (behind the slot header)."""
    from kvstore.tiers.ssd.format import HEADER_BYTES, slot_offset
    return slot_offset(slot, LAYOUT.slot_bytes) + HEADER_BYTES


def chain(seed: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and block bytes for one chain, both derived from ``seed``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50000, n_blocks * LAYOUT.block_tokens)
    data = rng.integers(0, 256, (n_blocks, *LAYOUT.block_shape), dtype=np.uint8)
    return tokens, data


def put_chain(ns, seed: int, n_blocks: int) -> tuple[list[bytes], np.ndarray]:
    tokens, data = chain(seed, n_blocks)
    keys = ns.block_keys(tokens)
    ns.put(keys, data).result(timeout=60)
    return keys, data


def get_exact(ns, keys, data) -> int:
    """Blocks found; asserts every found block equals what was written."""
    out = np.empty((len(keys), *LAYOUT.block_shape), dtype=np.uint8)
    got = ns.get(keys, out=out).result(timeout=60)
    assert np.array_equal(np.asarray(got), data[:len(got)]), "served bytes differ from written"
    return len(got)


def ssd_stats(client) -> dict:
    st = client.stats()
    return {t.tier: t for t in st.tiers}


def tier(stats, name):
    from kvstore.v1 import kvstore_pb2 as pb
    return stats[getattr(pb, f"TIER_{name}")]


def on_ssd(daemon_factory, tmp_path, n_chains=1, n_blocks=16, extra=()):
    """Put chains, restart the daemon: every block is then on SSD only (recovered)."""
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        chains = [put_chain(ns, seed, n_blocks) for seed in range(n_chains)]
    d.stop()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB", *extra), workdir=tmp_path / "after")
    return d2, chains


def expected_ssd_io() -> str:
    """What a daemon's SSD tier moves slots through here (stats' backend): "io_uring" where
    this kernel lets a process set one up, else "threads"."""
    from kvstore.tiers.ssd.uring import Ring
    ring = Ring.create(8)
    if ring is None:
        return "threads"
    ring.close()
    return "io_uring"
