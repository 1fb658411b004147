"""kvstore's KV events into NVIDIA Dynamo's KV router index (``dynamo.llm.RadixTree``).

    from kvstore.events.dynamo import DynamoIndex, request_hashes

    index = DynamoIndex()
    index.add_daemon(0, "tcp://host-a:5557", "tcp://host-a:5558")   # worker id 0, synced
    index.add_daemon(1, "tcp://host-b:5557", "tcp://host-b:5558")
    ...
    index.pump(timeout_s=0.0)                       # apply what has arrived (call often)
    hashes = request_hashes(namespace_id, token_ids, block_tokens=16)
    index.find_matches(hashes)                      # {worker_id: blocks of the prefix held}
    index.find_matches_by_tier(hashes)              # {worker_id: {"CPU": n, "STORAGE": m}}

What Dynamo expects: ``RadixTree.apply_event(worker_id, json)`` takes Dynamo's own
``KvCacheEvent`` (``{"event_id", "data": {"stored": {"parent_hash", "blocks": [{"block_hash",
"tokens_hash"}]}} | {"removed": {"block_hashes"}} | "cleared"}``), and ``find_matches`` walks
the tree by ``tokens_hash``. Dynamo computes a request's ``tokens_hash`` from token ids per block;
kvstore's events carry block keys instead (kvstore.events.wire), and a block key already is a
hash of the block's tokens and of its whole prefix. So both hashes are the key's first 8 bytes
(little-endian u64), and a request's hashes are its kvstore keys cut the same way
(:func:`request_hashes`, :func:`hashes_of_keys`). A key names its whole prefix: a block filed
under a wrong parent can never be matched by a request it does not belong to.

Tiers: the daemon reports each tier separately (a demotion is ``BlockRemoved`` CPU then — or
before — ``BlockStored`` STORAGE). Dynamo's tree holds one copy per worker, so this adapter keeps,
per worker, which media hold each block, stores a block in the tree when its first medium gets
it and removes it when its last medium drops it; :meth:`find_matches_by_tier` splits a worker's
overlap by medium. A block whose parent the tree does not hold yet (a snapshot lists DRAM before
SSD, so a DRAM block may come before its SSD-only parent) waits until the parent is stored
(:attr:`orphans` counts the waiting blocks): Dynamo refuses a block under an unknown parent, and
a prefix walk could not reach it anyway.

Thread-safety: one thread calls :meth:`pump` / :meth:`apply_batch` and the queries.
"""
from __future__ import annotations

import itertools
import json
from typing import Iterable, Sequence

from kvstore.core.keys import chain_keys
from kvstore.events import wire
from kvstore.events.subscriber import EventSubscriber

_MEDIA = {wire.MEDIUM_CPU: 1, wire.MEDIUM_STORAGE: 2, wire.MEDIUM_GPU: 4}
_OTHER = 8


def hashes_of_keys(keys: Iterable[bytes | int]) -> list[int]:
    """Dynamo hashes (u64) of kvstore block keys: their first 8 bytes, little-endian."""
    return [k if isinstance(k, int) else int.from_bytes(k[:8], "little") for k in keys]


def request_hashes(namespace_id: bytes, token_ids: Sequence[int], block_tokens: int) -> list[int]:
    """What :meth:`DynamoIndex.find_matches` takes for a request: its full blocks' kvstore keys
    (``namespace_id``: kvstore.core.keys.namespace_digest(model id, layout, tenant), also
    ``Namespace.namespace_id`` in the SDK) as Dynamo hashes."""
    return hashes_of_keys(chain_keys(namespace_id, token_ids, block_tokens))


class DynamoIndex:
    def __init__(self):
        from dynamo.llm import RadixTree     # ai-dynamo-runtime
        self._tree = RadixTree()
        self._ids = itertools.count()
        self._held: dict[int, dict[int, int]] = {}      # worker -> block -> media bits
        self._in_tree: dict[int, set[int]] = {}          # worker -> blocks stored in the tree
        self._waiting: dict[int, dict[int, list[int]]] = {}   # worker -> parent -> children
        self._feeds: dict[int, EventSubscriber] = {}
        self.rejected = 0         # events Dynamo refused (counted, never raised)

    # -- feeding ---------------------------------------------------------------------------------
    def add_daemon(self, worker_id: int, endpoint: str, replay_endpoint: str = "",
                   topic: str = "") -> None:
        """Follow one daemon's events as ``worker_id``. With a replay endpoint the index starts
        from the daemon's snapshot and fills gaps by replay or a new snapshot."""
        sub = EventSubscriber(endpoint, replay_endpoint, topic)
        self._feeds[worker_id] = sub
        if replay_endpoint:
            for _, batch in sub.sync():
                self.apply_batch(worker_id, batch)

    def pump(self, timeout_s: float = 0.0) -> int:
        """Apply every batch that has arrived from every daemon; returns how many. Waits up to
        ``timeout_s`` on each daemon's stream for its first batch."""
        n = 0
        for worker_id, sub in self._feeds.items():
            for _, batch in sub.poll(timeout_s):
                self.apply_batch(worker_id, batch)
                n += 1
        return n

    def subscriber(self, worker_id: int) -> EventSubscriber:
        return self._feeds[worker_id]

    def close(self) -> None:
        for sub in self._feeds.values():
            sub.close()
        self._feeds.clear()

    def apply_batch(self, worker_id: int, batch: wire.KVEventBatch) -> None:
        for event in batch.events:
            self.apply_event(worker_id, event)

    def apply_event(self, worker_id: int, event) -> None:
        """One kvstore event (a kvstore.events.wire struct, or vLLM's own class of that name)."""
        kind = type(event).__name__
        held = self._held.setdefault(worker_id, {})
        tree = self._in_tree.setdefault(worker_id, set())
        if kind == "AllBlocksCleared":
            held.clear()
            tree.clear()
            self._waiting.pop(worker_id, None)
            self._send(worker_id, "cleared")
        elif kind == "BlockStored":
            self._stored(worker_id, held, tree, event)
        elif kind == "BlockRemoved":
            bit = _MEDIA.get(event.medium, _OTHER)
            gone = []
            for h in hashes_of_keys(event.block_hashes):
                mask = held.get(h, 0) & ~bit
                if mask:
                    held[h] = mask
                    continue
                held.pop(h, None)
                if h in tree:
                    tree.discard(h)
                    gone.append(h)
            if gone:
                self._send(worker_id, {"removed": {"block_hashes": gone}})

    def _stored(self, worker_id: int, held: dict, tree: set, event) -> None:
        bit = _MEDIA.get(event.medium, _OTHER)
        parent = None if event.parent_block_hash is None else \
            hashes_of_keys([event.parent_block_hash])[0]
        run: list[int] = []
        run_parent = None
        for h in hashes_of_keys(event.block_hashes):
            new = h not in tree
            held[h] = held.get(h, 0) | bit
            if new:
                if parent is not None and parent not in tree:
                    self._waiting.setdefault(worker_id, {}).setdefault(parent, []).append(h)
                    parent = h
                    continue
                if run and run[-1] != parent:
                    self._store(worker_id, run_parent, run)
                    run = []
                if not run:
                    run_parent = parent
                run.append(h)
                tree.add(h)
            parent = h
        if run:
            self._store(worker_id, run_parent, run)

    def _store(self, worker_id: int, parent: int | None, blocks: list[int]) -> None:
        self._send(worker_id, {"stored": {"parent_hash": parent, "blocks": [
            {"block_hash": h, "tokens_hash": h} for h in blocks]}})
        waiting = self._waiting.get(worker_id)
        if not waiting:
            return
        held, tree = self._held[worker_id], self._in_tree[worker_id]
        stack = [h for h in blocks if h in waiting]
        while stack:                       # children that waited for these blocks, and theirs
            p = stack.pop()
            for c in waiting.pop(p, ()):
                if held.get(c) and c not in tree:
                    tree.add(c)
                    self._send(worker_id, {"stored": {"parent_hash": p, "blocks": [
                        {"block_hash": c, "tokens_hash": c}]}})
                    if c in waiting:
                        stack.append(c)

    @property
    def orphans(self) -> int:
        """Blocks held but not in the tree: waiting for their parent to be stored."""
        return sum(len(v) for w in self._waiting.values() for v in w.values())

    def _send(self, worker_id: int, data) -> None:
        body = json.dumps({"event_id": next(self._ids), "data": data}).encode()
        try:
            self._tree.apply_event(worker_id, body)
        except (RuntimeError, ValueError):
            self.rejected += 1

    # -- queries -----------------------------------------------------------------------------------
    def find_matches(self, hashes: Sequence[int]) -> dict[int, int]:
        """{worker_id: how many leading blocks of ``hashes`` it holds in any tier} (workers
        holding none are absent)."""
        scores = self._tree.find_matches(list(hashes)).scores
        out: dict[int, int] = {}
        for key, n in scores.items():
            worker = key[0] if isinstance(key, tuple) else key
            out[worker] = max(out.get(worker, 0), n)
        return out

    def find_matches_by_tier(self, hashes: Sequence[int]) -> dict[int, dict[str, int]]:
        """{worker_id: {medium: blocks of its matched prefix that medium holds}} (a block in
        DRAM and on SSD counts in both)."""
        out = {}
        for worker, n in self.find_matches(hashes).items():
            held = self._held.get(worker, {})
            counts = {m: 0 for m in _MEDIA}
            for h in hashes[:n]:
                mask = held.get(h, 0)
                for m, bit in _MEDIA.items():
                    if mask & bit:
                        counts[m] += 1
            out[worker] = {m: c for m, c in counts.items() if c}
        return out

    def blocks(self, worker_id: int) -> int:
        """Blocks the index holds for a worker (in any tier)."""
        return len(self._held.get(worker_id, {}))
