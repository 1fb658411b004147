"""The cluster-tier tests' shared helpers: hosts (daemons) on one engine, chains, counters."""
from __future__ import annotations

import time

import numpy as np

from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb

# 2 layers x 4 heads x 64 dims x 16 tokens x uint8 x (k, v) = 16 KiB per block
LAYOUT = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="uint8")
MODEL = "remote-model"
DEADLINE_S = 0.3
READ_DEADLINE_S = 2.0


def host(daemon_factory, tmp_path, name: str, url: str, *extra: str, env: dict | None = None):
    """One "host": a daemon with its own socket, arena and SSD dir, on the shared engine."""
    wd = tmp_path / name
    wd.mkdir()
    return daemon_factory(
        "--dram-bytes", "8MiB", "--chunk-bytes", "1MiB", "--ssd-dir", str(wd / "ssd"),
        "--ssd-bytes", "16MiB", "--ssd-segment-bytes", "4MiB", "--ssd-io-threads", "2",
        "--remote", url, "--remote-deadline-s", str(DEADLINE_S),
        "--remote-read-deadline-s", str(READ_DEADLINE_S), "--remote-retry-s", "0.5",
        "--remote-segment-bytes", "64MiB", "--remote-buffer-bytes", "16MiB", *extra,
        workdir=wd, env=env)


def chain(seed: int, n_blocks: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50000, n_blocks * LAYOUT.block_tokens)
    data = rng.integers(0, 256, (n_blocks, *LAYOUT.block_shape), dtype=np.uint8)
    return tokens, data


def remote_row(client) -> pb.TierStats:
    rows = [t for t in client.stats().tiers if t.tier == pb.TIER_REMOTE]
    assert len(rows) == 1, "no REMOTE row in stats"
    return rows[0]


def wait_for(pred, timeout_s: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def put_on(client, seed: int, n: int):
    ns = client.namespace(MODEL, LAYOUT)
    tokens, data = chain(seed, n)
    keys = ns.block_keys(tokens)
    assert ns.put(keys, data).result(timeout=30) == n
    return ns, keys, data
