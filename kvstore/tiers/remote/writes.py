"""The remote tier's write path: committed blocks reach the engine in the background.

    on_commit(bids)         write_through: queue freshly committed blocks for the writer.
    on_hits(bids)           write_through_selective: queue blocks read ``write_hits`` times.
    flush(ns, keys, deadline_s) -> (placed per key, timed out): wait until the blocks are
                            readable from the engine.

Queued blocks are pinned (their DRAM slots hold their bytes until the writer sent them); a
full queue skips and counts. Writes are content-addressed: the writer asks which keys the
engine already has (another host stored them) and sends only the rest, straight from the
arena slots. The blocks are read through kvstore.tiers.remote.slots.FillSlots, never the
store.
"""
from __future__ import annotations

import asyncio
import collections
import time

from kvstore.policies.write import REMOTE_WRITE_POLICIES, write_policy
from kvstore.tiers.remote.codec import encode_header, remote_key
from kvstore.tiers.remote.engine import EngineCalls, RemoteUnavailable, ewma
from kvstore.tiers.remote.slots import FillSlots

WRITE_BATCH = 32             # blocks per background write (one existence call + one put)


class RemoteWrites:
    """The background writer and its queue (see the module docstring)."""

    def __init__(self, engine: EngineCalls, slots: FillSlots, *, policy: str, write_hits: int,
                 queue_blocks: int, deadline_s: float):
        try:   # kvstore.policies.write: the same policies as the SSD tier's, but write_back
            self._write_policy = write_policy(policy, write_hits, REMOTE_WRITE_POLICIES)
        except ValueError as exc:
            raise ValueError(f"remote policy {exc}") from None
        self.engine = engine
        self.slots = slots
        self.queue_blocks = queue_blocks
        self.deadline_s = deadline_s
        self.counters = engine.counters
        self._queue: collections.deque[int] = collections.deque()   # pinned block ids
        self._queued: set[int] = set()
        self._writer: asyncio.Task | None = None
        # set (and replaced) after every batch the writer finished: flush() waits on it
        self._wrote = asyncio.Event()
        self.write_bw = 0.0

    def queue_depth(self) -> int:
        return len(self._queue)

    async def drain(self, timeout_s: float) -> bool:
        """Wait for the queued writes, at most ``timeout_s``; False if some were left."""
        if self._writer is None or self._writer.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    # -- write path -----------------------------------------------------------------------------
    def on_commit(self, bids: list[int]) -> None:
        if self._write_policy.on_commit:
            self._enqueue(bids)

    def on_hits(self, bids: list[int]) -> None:
        hits = self.slots.hits(bids)
        if not self._write_policy.due(hits).any():
            return
        due = []
        flags = self._write_policy.due(hits).tolist()
        cand = [b for b, is_due in zip(bids, flags) if is_due and b not in self._queued]
        for b, ref in zip(cand, self.slots.refs(cand)):
            if ref is not None and not self.engine.known(remote_key(ref.namespace_id, ref.key)):
                due.append(b)
        if due:
            self._enqueue(due)

    def _enqueue(self, bids: list[int]) -> None:
        if self.engine.closed:
            return
        take = []
        for b, ref in zip(bids, self.slots.refs(bids)):
            if b in self._queued or ref is None:
                continue
            if len(self._queue) + len(take) >= self.queue_blocks:
                self.counters.writes_skipped += 1
                continue
            take.append(b)
        if not take:
            return
        self.slots.pin(take)    # the slot must hold these bytes until the writer sent them
        self._queue.extend(take)
        self._queued.update(take)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(WRITE_BATCH, len(self._queue)))]
            try:
                items = [(remote_key(r.namespace_id, r.key), r.key, r.namespace_id, r.offset,
                          r.block_bytes) for r in self.slots.refs(batch) if r is not None]
                if not items:
                    continue
                t0 = time.monotonic()
                try:
                    sent, present, failed, skipped = await self.engine.call(self._write_batch, items)
                except RemoteUnavailable:
                    self.counters.writes_skipped += len(items)
                    continue
                nbytes = sum(it[4] for it, s in zip(items, sent) if s)
                c = self.counters
                c.writes += sum(sent)
                c.writes_deduplicated += sum(present)
                c.writes_failed += sum(failed)
                c.writes_skipped += sum(skipped)
                c.bytes_in += nbytes
                if nbytes:
                    self.write_bw = ewma(self.write_bw, nbytes, time.monotonic() - t0)
                for it, s, p in zip(items, sent, present):
                    if s or p:
                        self.engine.remember(it[0])
            finally:
                self._queued.difference_update(batch)
                self.slots.unpin(batch)
                wrote, self._wrote = self._wrote, asyncio.Event()
                wrote.set()

    def _write_batch(self, items):
        """(pool thread) Existence check, then put what the remote lacks, straight from the
        arena slots. Returns (sent, already there, refused, not sent: node unavailable) per
        item."""
        rkeys = [it[0] for it in items]
        present = self.engine.backend.exists(rkeys)
        todo = [i for i, p in enumerate(present) if not p]
        sent = [False] * len(items)
        failed = [False] * len(items)
        skipped = [False] * len(items)
        if todo:
            buf = self.slots.arena
            headers = [encode_header(items[i][1], items[i][2],
                                     buf[items[i][3]:items[i][3] + items[i][4]]) for i in todo]
            ok = self.engine.backend.put([rkeys[i] for i in todo], headers,
                                  [items[i][3] for i in todo], [items[i][4] for i in todo])
            for i, good in zip(todo, ok):
                if good is None:
                    skipped[i] = True
                else:
                    sent[i], failed[i] = good, not good
        return sent, present, failed, skipped

    async def flush(self, namespace_id: bytes, keys_blob: bytes,
                    deadline_s: float) -> tuple[list[bool], bool]:
        """Wait until every block of ``keys`` is readable from the engine, at most
        ``deadline_s``. Returns (placed, timed_out): placed[i] — the engine holds block i (this
        daemon wrote it or found it there; another host may have stored it); timed_out — the
        deadline passed while some were still queued or being written.

        A block this daemon holds in DRAM that the engine lacks is queued for the writer now
        (whatever the write policy) and queued again when a write of it was skipped (engine or
        node unavailable, queue full) while the deadline allows. A block held only on SSD, or
        not at all, is placed only if the engine already has it. Raises KVStoreError for an
        unknown namespace or malformed keys."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        ns, keys, bids = self.slots.find(namespace_id, keys_blob)
        rkeys = [remote_key(ns.namespace_id, k) for k in keys]
        known = self.engine.known
        timed_out = False
        while True:
            held = self.slots.refs(bids)
            todo = [b for b, rk, ref in zip(bids, rkeys, held)
                    if not known(rk) and ref is not None]
            self._enqueue([b for b in todo if b not in self._queued])
            waiting = [b for b in todo if b in self._queued]
            if not waiting or self.engine.closed:
                break
            left = end - loop.time()
            if left <= 0:
                timed_out = True
                break
            try:
                await asyncio.wait_for(self._wrote.wait(), left)
            except asyncio.TimeoutError:
                timed_out = True
                break
            if any(b not in self._queued and not known(rk)
                   for b, rk in zip(bids, rkeys) if b in waiting):
                # a write was skipped (engine or node unavailable): retry, not in a hot loop
                await asyncio.sleep(min(0.05, max(end - loop.time(), 0)))
        rest = [i for i, rk in enumerate(rkeys) if not known(rk)]
        if rest:     # held elsewhere, or written by another host: ask the engine once
            try:
                present = await self.engine.call(self.engine.backend.exists, [rkeys[i] for i in rest],
                                           deadline_s=max(min(self.deadline_s,
                                                              end - loop.time()), 0.01))
            except RemoteUnavailable:
                present = [False] * len(rest)
            for i, p in zip(rest, present):
                if p:
                    self.engine.remember(rkeys[i])
        return [known(rk) for rk in rkeys], timed_out

