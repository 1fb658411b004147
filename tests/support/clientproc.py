"""A client process for integration tests: `python tests/support/clientproc.py MODE SOCKET ...`.

Block bytes are a pure function of the block key, so any process can check any block it reads.
Modes:
  churn SEED ROUNDS   put and get random prefixes of one shared token stream; verify every byte
  put-and-die N       allocate N blocks, write half of them, then SIGKILL itself before commit
  lease-and-die N     put N blocks, lease them, then SIGKILL itself without releasing
Prints one JSON line of counters; exit 0 only if every byte read was right.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys

import numpy as np

from kvstore.client import KVClient, KVLayout
from kvstore.core.keys import pack_keys
from kvstore.v1 import kvstore_pb2 as pb

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_tokens=16, dtype="float32")
STREAM = list(range(10_000, 10_000 + 16 * 64))  # 64 blocks of a shared "document"


def block_bytes_for(key: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8)


def blocks_for(keys) -> np.ndarray:
    raw = np.stack([block_bytes_for(k) for k in keys])
    return raw.view(np.float32).reshape(len(keys), *LAYOUT.block_shape)


def churn(sock: str, seed: int, rounds: int) -> dict:
    rng = random.Random(seed)
    stats = {"puts": 0, "written": 0, "gets": 0, "blocks_read": 0, "bad": 0}
    with KVClient(sock, client_name=f"churn{seed}") as c:
        ns = c.namespace("shared-doc", LAYOUT)
        for _ in range(rounds):
            n_tokens = rng.randint(16, len(STREAM))
            tokens = STREAM[:n_tokens] + [rng.randint(0, 9) for _ in range(rng.randint(0, 40))]
            keys = ns.block_keys(tokens)
            if not keys:
                continue
            if rng.random() < 0.5:
                stats["written"] += ns.put(keys, blocks_for(keys)).result()
                stats["puts"] += 1
            got = ns.get(keys).result()
            stats["gets"] += 1
            stats["blocks_read"] += len(got)
            if len(got):
                want = blocks_for(keys[: len(got)])
                if not np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8)):
                    stats["bad"] += 1
    return stats


def put_and_die(sock: str, n: int) -> None:
    c = KVClient(sock, client_name="doomed-writer")
    ns = c.namespace("shared-doc", LAYOUT)
    keys = ns.block_keys(list(range(900_000, 900_000 + 16 * n)))
    ns._register()
    r = c.call("Allocate", pb.AllocateRequest(session_id=c.session_id,
                                              namespace_id=ns.namespace_id, keys=pack_keys(keys)))
    arena = c.datapath.arena_view.np
    for off in list(r.offsets)[: n // 2]:
        arena[off:off + LAYOUT.block_bytes] = 0xAB
    print(json.dumps({"allocated": len(r.offsets)}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def lease_and_die(sock: str, n: int) -> None:
    c = KVClient(sock, client_name="doomed-reader")
    ns = c.namespace("shared-doc", LAYOUT)
    keys = ns.block_keys(list(range(800_000, 800_000 + 16 * n)))
    ns.put(keys, blocks_for(keys)).result()
    lease = ns.acquire(keys)
    print(json.dumps({"leased": len(lease)}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode, sock = sys.argv[1], sys.argv[2]
    if mode == "churn":
        out = churn(sock, int(sys.argv[3]), int(sys.argv[4]))
        print(json.dumps(out))
        sys.exit(1 if out["bad"] else 0)
    elif mode == "put-and-die":
        put_and_die(sock, int(sys.argv[3]))
    elif mode == "lease-and-die":
        lease_and_die(sock, int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode}")
