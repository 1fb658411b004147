"""vLLM's KV-event wire format (``vllm.distributed.kv_events``, vLLM 0.32), and kvstore's media.

A publication is three ZMQ frames: ``topic`` (bytes, "" by default), ``seq`` (8 bytes, big-endian
unsigned: one number per batch, consecutive; a skipped number is a lost batch) and ``payload``,
the msgpack encoding of a ``KVEventBatch``: an array ``[ts, events]`` (``data_parallel_rank``
is omitted) whose events are maps tagged by class name under the key ``"type"``
(``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``), fields in vLLM's order, defaults
omitted. The structs below declare the same classes, fields, order and options as vLLM's, so
vLLM's own decoder reads what this module encodes (tests/events/test_vllm_conformance.py).

Block hashes are kvstore's 16-byte block keys (vLLM's ``ExternalBlockHash`` is ``bytes | int``):
``key_i = BLAKE2b(key_{i-1} | tokens of block i)``, seeded by the namespace digest
(kvstore.core.keys). ``token_ids`` is always empty: a router matches a request by computing the
same keys from the request's tokens (kvstore.events.dynamo.request_hashes), which works for
every block the daemon holds, including those recovered from SSD after a restart, whose token ids
the daemon never kept.
"""
from __future__ import annotations

from typing import Any

import msgspec

from kvstore.events.media import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE  # noqa: F401

END_SEQ = (-1).to_bytes(8, "big", signed=True)   # replay/snapshot answer: no more batches
SNAPSHOT_REQUEST = b"snapshot"                   # replay socket: ask for every block held


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the three events (tagged by class name)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one payload frame; raises msgspec.DecodeError (a ValueError) on bad bytes."""
    return _decoder.decode(payload)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def seq_of(frame: bytes) -> int:
    """The sequence number of a seq frame (-1: END_SEQ)."""
    return int.from_bytes(frame, "big", signed=True)
