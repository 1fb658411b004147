"""A reader process for tests/store/test_reads.py: `python tests/support/readerproc.py SOCKET N SHM
[LOCAL]`.

Puts N blocks whose bytes are a function of their key (tag 0), prints "ready", then gets them
in a loop and prints one JSON line per get: {"n": blocks returned, "bad": blocks whose bytes are
not the ones put under their key, "error": error class or ""}. The test stops it with SIGSTOP,
reuses its slots, and resumes it. SHM: 1 maps the arena, 0 streams bytes over gRPC. LOCAL: 1
lets gets read DRAM blocks lease-free from the index snapshot, 0 (default) makes every get take
a lease (the tests of the leased read stop the reader while it holds one).
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from kvstore.client import KVClient, KVLayout

# 512 KiB blocks: a batch's copy takes long enough to be stopped in the middle of
LAYOUT = KVLayout(num_layers=8, num_kv_heads=8, head_dim=64, block_tokens=16, dtype="float32")


def block_for(key: bytes, tag: int) -> np.ndarray:
    """The bytes of a block: its key and a tag (0: the reader's, 1: the churner's)."""
    seed = int.from_bytes(hashlib.blake2b(key + bytes([tag]), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(LAYOUT.block_shape, dtype=np.float32)


def main() -> int:
    sock, n, shm = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    local = len(sys.argv) > 4 and sys.argv[4] == "1"
    with KVClient(sock, shared_memory=shm, copy_threads=1, timeout_s=30) as c:
        ns = c.namespace("reads", LAYOUT)
        ns.local_gets = local
        keys = ns.block_keys(list(range(16 * n)))
        want = np.stack([block_for(k, 0) for k in keys])
        ns.put(keys, want).result()
        print("ready", flush=True)
        while True:
            try:
                got = ns.get(keys).result()
            except Exception as exc:  # noqa: BLE001 - reported, the test judges it
                print(json.dumps({"n": 0, "bad": 0, "error": type(exc).__name__}), flush=True)
                continue
            bad = sum(not np.array_equal(got[i], want[i]) for i in range(len(got)))
            print(json.dumps({"n": len(got), "bad": bad, "error": "",
                              "local": ns.local_gets_answered}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
