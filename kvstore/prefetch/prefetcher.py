"""Prefetch: scheduler hints that bring SSD blocks into DRAM before the get that needs them.

    submit(session, namespace, [(keys, deadline_s), ...])   the cached prefix of each item is
                      pinned at once (so eviction never takes what a pending prefetch needs),
                      and its SSD-only blocks are queued for promotion in deadline order.
    on_hits(bids)     a get read these blocks: each prefetch holding one of them ends,
                      counted on time (its transfer had finished) or late (the get came first;
                      the get then shares the transfer still in flight — SSDTier.fetch).
    cancel(session, ids), expire()
                      every prefetch ends exactly once: done (read by a get), expired (its
                      lease of deadline + grace ran out unread: wasted), or cancelled (by the
                      client, or because its session ended). Ending unpins its blocks and drops
                      every trace of it; nothing grows without bound (max_pending).

At most ``concurrency`` prefetches have reads in flight; the rest wait in a deadline heap. Each
runs through BlockStore.fetch (the SSD tier's shared, pinned, checksum-verified reads that a get
uses); with ``to_hbm`` the HBM tier then copies the DRAM blocks in. Built by the daemon's
composition root over the store; everything runs on the daemon's event loop; ``expire`` is
called by the daemon's expiry loop.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import dataclass

from kvstore.core.errors import InvalidArgument, Reason, ResourceExhausted
from kvstore.store.table import COMMITTED, NO_SLOT

log = logging.getLogger("kvstore.prefetch.prefetcher")

QUEUED, RUNNING, READY, ENDED = range(4)


@dataclass(eq=False)
class Prefetch:
    prefetch_id: int
    session_id: int
    block_ids: list[int]          # pinned until the prefetch ends
    to_read: list[int]            # SSD-only at submit
    deadline: float
    expires: float
    state: int = QUEUED
    block_bytes: int = 0
    to_hbm: bool = False          # stage in the HBM tier, not just DRAM


@dataclass
class PrefetchCounters:
    issued: int = 0
    on_time: int = 0
    late: int = 0
    wasted: int = 0
    cancelled: int = 0
    bytes_promoted: int = 0


class Prefetcher:
    def __init__(self, store, concurrency: int = 4, grace_s: float = 5.0,
                 max_pending: int = 65536, clock=time.monotonic, max_session_bytes: int = 0):
        """max_session_bytes: bytes of blocks one session's pending prefetches may pin (0: no
        limit) — so no client can pin the DRAM tier and starve everyone else's puts."""
        self.store = store
        self.table = store.table
        self.hbm = store.hbm
        self.max_session_bytes = max_session_bytes
        self._session_blocks: dict[int, dict[int, int]] = {}   # session -> block -> prefetches
        self._session_bytes: dict[int, int] = {}               # session -> bytes of those blocks
        self.concurrency = concurrency
        self.grace_s = grace_s
        self.max_pending = max_pending
        self.clock = clock
        self.counters = PrefetchCounters()
        self.live: dict[int, Prefetch] = {}
        self._queue: list[tuple[float, int]] = []     # (deadline, id), lazily pruned
        self._expiry: list[tuple[float, int]] = []    # (expires, id), lazily pruned
        self._by_block: dict[int, set[int]] = {}
        self._by_session: dict[int, set[int]] = {}
        self._running = 0
        self._tasks: set[asyncio.Task] = set()
        self._next_id = 1

    # -- the protocol --------------------------------------------------------------------------
    def submit(self, session_id: int, namespace_id: bytes, items: list[tuple[bytes, float]],
               grace_s: float = 0.0, to_hbm: bool = False) -> list[tuple[int, int, int]]:
        """Queue prefetches; (prefetch id or 0 when nothing is cached, blocks, SSD-only blocks).
        ``to_hbm`` (the daemon has an HBM tier): stage every block in HBM."""
        store, idx = self.store, self.table
        store.session(session_id)
        ns = store.namespace(namespace_id)
        if not grace_s >= 0:
            raise InvalidArgument(f"grace_s must be >= 0, got {grace_s}", Reason.BAD_ARGUMENT)
        if len(self.live) + len(items) > self.max_pending:
            raise ResourceExhausted(
                f"{len(self.live)} prefetches pending (max_pending_prefetches="
                f"{self.max_pending}): wait for gets or deadlines, or cancel some",
                Reason.OVER_LIMIT)
        parsed = []
        for keys_blob, deadline_s in items:
            if not deadline_s >= 0 or deadline_s > 86400:
                raise InvalidArgument(f"deadline_s must be in [0, 86400], got {deadline_s}",
                                      Reason.BAD_ARGUMENT)
            parsed.append((store.parse_keys(keys_blob), deadline_s))   # validate all before any
        resolved = [(idx.committed_prefix(ns.index, keys).tolist(), deadline_s)
                    for keys, deadline_s in parsed]
        held = self._session_blocks.get(session_id, {})
        if self.max_session_bytes:
            # Bytes this session's prefetches pin: distinct blocks (overlapping prefixes of one
            # chain pin the same memory once).
            new = {b for bids, _ in resolved for b in bids if b not in held}
            asked = len(new) * ns.layout.block_bytes
            pinned = self._session_bytes.get(session_id, 0)
            if pinned + asked > self.max_session_bytes:
                raise ResourceExhausted(
                    f"prefetch of {asked} more bytes refused: this client's pending prefetches "
                    f"already pin {pinned} bytes (max_prefetch_bytes_per_client="
                    f"{self.max_session_bytes}); wait for its gets or deadlines, or cancel some",
                    Reason.OVER_LIMIT)
        now = self.clock()
        grace = grace_s or self.grace_s
        out = []
        for bids, deadline_s in resolved:
            if not bids:
                out.append((0, 0, 0))
                continue
            if to_hbm:
                to_read = [b for b in bids if not self.hbm.has(b)]
            else:
                to_read = [b for b in bids if idx.dram[b] == NO_SLOT]
            p = Prefetch(self._next_id, session_id, bids, to_read, now + deadline_s,
                         now + deadline_s + grace, block_bytes=ns.layout.block_bytes,
                         to_hbm=to_hbm)
            self._next_id += 1
            idx.pin(bids)
            held = self._session_blocks.setdefault(session_id, held)
            for b in bids:
                if b not in held:
                    held[b] = 0
                    self._session_bytes[session_id] = \
                        self._session_bytes.get(session_id, 0) + p.block_bytes
                held[b] += 1
            self.live[p.prefetch_id] = p
            for b in bids:
                self._by_block.setdefault(b, set()).add(p.prefetch_id)
            self._by_session.setdefault(session_id, set()).add(p.prefetch_id)
            heapq.heappush(self._expiry, (p.expires, p.prefetch_id))
            if to_read and (store.ssd is not None or to_hbm):
                heapq.heappush(self._queue, (p.deadline, p.prefetch_id))
            else:
                p.state = READY
            self.counters.issued += 1
            out.append((p.prefetch_id, len(bids), len(to_read)))
        self._kick()
        return out

    def on_hits(self, block_ids: list[int]) -> None:
        """A get read these blocks (kvstore.store.reads.HitObserver): end the prefetches that
        were waiting for it."""
        if not self._by_block:
            return
        for b in block_ids:
            for pid in list(self._by_block.get(b, ())):
                p = self.live.get(pid)
                if p is not None:
                    self._end(p, "on_time" if p.state == READY else "late")

    def cancel(self, session_id: int, prefetch_ids: list[int]) -> int:
        self.store.session(session_id)
        n = 0
        for pid in prefetch_ids:
            p = self.live.get(pid)
            if p is not None and p.session_id == session_id:
                self._end(p, "cancelled")
                n += 1
        return n

    def expire(self) -> None:
        """End prefetches whose lease ran out (wasted) or whose session is gone (cancelled)."""
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, pid = heapq.heappop(self._expiry)
            p = self.live.get(pid)
            if p is not None:
                self._end(p, "wasted")
        for sid in [s for s in self._by_session if s not in self.store.sessions]:
            for pid in list(self._by_session.get(sid, ())):
                self._end(self.live[pid], "cancelled")
        # The heaps hold ended ids until they surface; rebuild when mostly dead.
        if len(self._expiry) > 2 * len(self.live) + 1024:
            self._expiry = [(p.expires, p.prefetch_id) for p in self.live.values()]
            heapq.heapify(self._expiry)
        if len(self._queue) > 2 * len(self.live) + 1024:
            self._queue = [(p.deadline, p.prefetch_id) for p in self.live.values()
                           if p.state == QUEUED]
            heapq.heapify(self._queue)

    def close(self) -> None:
        for p in list(self.live.values()):
            self._end(p, "cancelled")
        for t in self._tasks:
            t.cancel()

    @property
    def pending(self) -> int:
        return len(self.live)

    # -- internals -----------------------------------------------------------------------------
    def _end(self, p: Prefetch, outcome: str) -> None:
        if p.state == ENDED:
            return
        p.state = ENDED
        del self.live[p.prefetch_id]
        for b in p.block_ids:
            s = self._by_block.get(b)
            if s is not None:
                s.discard(p.prefetch_id)
                if not s:
                    del self._by_block[b]
        s = self._by_session.get(p.session_id)
        if s is not None:
            s.discard(p.prefetch_id)
            if not s:
                del self._by_session[p.session_id]
        self.table.unpin(p.block_ids)
        held = self._session_blocks.get(p.session_id, {})
        for b in p.block_ids:
            held[b] -= 1
            if not held[b]:
                del held[b]
                self._session_bytes[p.session_id] -= p.block_bytes
        if not held:
            self._session_blocks.pop(p.session_id, None)
            self._session_bytes.pop(p.session_id, None)
        setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)

    def _kick(self) -> None:
        """Start queued prefetches, earliest deadline first, up to the concurrency bound."""
        while self._running < self.concurrency and self._queue:
            _, pid = heapq.heappop(self._queue)
            p = self.live.get(pid)
            if p is None or p.state != QUEUED:
                continue
            p.state = RUNNING
            self._running += 1
            t = asyncio.get_running_loop().create_task(self._run(p))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _run(self, p: Prefetch) -> None:
        idx = self.table
        try:
            # Blocks are pinned by the prefetch; skip what a get already brought in or a
            # delete took (a pinned deleted block waits for its unpin to be freed).
            need = [b for b in p.to_read if idx.dram[b] == NO_SLOT and idx.state[b] == COMMITTED]
            if p.to_hbm:
                need = [b for b in need if not self.hbm.has(b)]
            if need and p.state != ENDED and self.store.ssd is not None:
                n = await self.store.fetch(need, to_hbm=p.to_hbm)
                self.counters.bytes_promoted += n * p.block_bytes
            if p.to_hbm and p.state != ENDED:
                # DRAM blocks (and SSD blocks read into DRAM): copied into HBM by the daemon
                stage = [b for b in p.to_read if idx.state[b] == COMMITTED and
                         idx.dram[b] != NO_SLOT and not self.hbm.has(b)]
                n = await self.hbm.copy_in(stage)
                self.counters.bytes_promoted += n * p.block_bytes
        except Exception:
            log.exception("prefetch %d failed; the get will read from SSD itself", p.prefetch_id)
        finally:
            if p.state == RUNNING:
                p.state = READY
            self._running -= 1
            self._kick()
