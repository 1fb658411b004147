"""A request trace as the replay and the ideal caches see it: requests over dense block ids,
each block with its kvstore key and its bytes.

Trace format (one JSON object per line, Mooncake's FAST'25 release): ``timestamp`` (arrival,
ms), ``input_length`` (prompt tokens), ``hash_ids`` (the prompt's blocks of ``TRACE_BLOCK_TOKENS``
tokens, a prefix chain: equal ids mean equal blocks with equal prefixes).

Keys are the SDK's own (kvstore.core.keys.chain_keys over the namespace digest): each block's
token ids are synthesized from its hash id (``block_token_ids``), so any process, or a router
that hashes a request's tokens, derives the same keys; Python's ``hash()`` is never involved.
A block's bytes are its key repeated (``block_bytes_of``), so every byte a get returns can be
checked against the key it was asked for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstore.core.keys import KEY_BYTES, chain_keys, namespace_digest
from kvstore.core.layout import KVLayout

TRACE_BLOCK_TOKENS = 512      # the trace's block size (hash_ids cover 512 tokens each)
SYNTH_VOCAB = 1 << 17         # synthesized token ids are in [0, SYNTH_VOCAB)
MODEL_ID = "bench-trace"
DEFAULT_TRACE = Path("../shared/traces/conversation_trace.jsonl")


def trace_layout(block_bytes: int) -> KVLayout:
    """The smallest layout of 512-token blocks of ``block_bytes`` bytes (1 layer, 1 kv head,
    uint8): the replay measures hits, not bandwidth, so blocks are as small as the tiers allow
    (their slots are 4 KiB aligned). ValueError unless block_bytes is a positive multiple of
    2 * 512 (k and v of 512 tokens)."""
    unit = 2 * TRACE_BLOCK_TOKENS
    if block_bytes <= 0 or block_bytes % unit:
        raise ValueError(f"--block-bytes must be a positive multiple of {unit}, got {block_bytes}")
    return KVLayout(num_layers=1, num_kv_heads=1, head_dim=block_bytes // unit,
                    block_tokens=TRACE_BLOCK_TOKENS, dtype="uint8")


def block_token_ids(hash_ids) -> np.ndarray:
    """The 512 token ids standing for trace block ``hash_id`` (an int: [512]; a sequence of n:
    [n, 512], concatenated row by row): splitmix64(hash_id * 512 + j) mod SYNTH_VOCAB for j in
    0..511 — deterministic, the same in every process."""
    h = np.asarray(hash_ids, dtype=np.uint64)
    x = h[..., None] * np.uint64(TRACE_BLOCK_TOKENS) + np.arange(
        TRACE_BLOCK_TOKENS, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(SYNTH_VOCAB)).astype(np.uint32)


def block_bytes_of(keys: list[bytes], block_bytes: int) -> np.ndarray:
    """[len(keys), block_bytes] uint8: each block's bytes are its 16-byte key repeated, so a
    block served under the wrong key (or torn) shows as wrong bytes."""
    raw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
    return np.tile(raw, (1, block_bytes // KEY_BYTES))


@dataclass(frozen=True)
class Request:
    arrival_s: float
    blocks: np.ndarray        # dense block ids of the prompt's chain, root first (int64)
    input_tokens: int


@dataclass
class Trace:
    """Requests over dense block ids 0..n_blocks-1 (numbered by first appearance)."""
    requests: list[Request]
    keys: list[bytes]          # kvstore key of each dense block id
    hash_ids: list[int]        # the trace's hash id of each dense block id
    depth: np.ndarray          # position of each block in its chain (root 0)
    namespace_id: bytes

    @property
    def n_blocks(self) -> int:
        return len(self.keys)

    @property
    def block_refs(self) -> int:
        return sum(len(r.blocks) for r in self.requests)

    @property
    def duration_s(self) -> float:
        """Arrival span of the requests (first to last), the real-time clock of the replay."""
        if len(self.requests) < 2:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    def chains(self) -> list[np.ndarray]:
        return [r.blocks for r in self.requests]


def parse_records(records, layout: KVLayout, limit: int | None = None) -> Trace:
    """Build a Trace from trace records (dicts as in the file). A block is identified by its
    whole chain (parent block + hash id), so a hash id reused under another prefix is another
    block, with another key — as in the daemon."""
    ns = namespace_digest(MODEL_ID, layout)
    ids: dict[tuple[int, int], int] = {}
    keys: list[bytes] = []
    hash_ids: list[int] = []
    depth: list[int] = []
    requests: list[Request] = []
    for n, rec in enumerate(records):
        if limit is not None and n >= limit:
            break
        parent, chain = -1, []
        hs = rec["hash_ids"]
        for d, h in enumerate(hs):
            bid = ids.get((parent, h))
            if bid is None:
                break
            chain.append(bid)
            parent = bid
        new = hs[len(chain):]
        if new:
            # A block is new only if its parent was already new or known: the rest of the
            # chain is new too, and one chain_keys call derives all of its keys.
            seed = keys[parent] if parent >= 0 else ns
            new_keys = chain_keys(seed, block_token_ids(new).reshape(-1), TRACE_BLOCK_TOKENS)
            for d, (h, key) in enumerate(zip(new, new_keys), start=len(chain)):
                bid = ids[(parent, h)] = len(keys)
                keys.append(key)
                hash_ids.append(h)
                depth.append(d)
                chain.append(bid)
                parent = bid
        requests.append(Request(rec["timestamp"] / 1000.0, np.asarray(chain, dtype=np.int64),
                                int(rec.get("input_length", len(chain) * TRACE_BLOCK_TOKENS))))
    return Trace(requests, keys, hash_ids, np.asarray(depth, dtype=np.int64), ns)


def load_trace(path: Path | str, layout: KVLayout, limit: int | None = None) -> Trace:
    """Read a JSON-lines trace file (its first ``limit`` requests). FileNotFoundError if absent."""
    def records():
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    return parse_records(records(), layout, limit)
