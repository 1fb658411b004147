"""The remote (cluster) tier: below SSD, shared by every daemon that names the same engine.

Contract with the daemon (all methods run on its event loop and never block it; engine calls
run in a bounded thread pool and every wait has a deadline):

    on_commit(bids)         write_through: queue freshly committed blocks for the background
                            writer (pinned while queued; a full queue skips and counts).
    on_hits(bids)           write_through_selective: queue blocks read ``write_hits`` times.
    probe(ns, keys, n)      -> m: after n local blocks, how many more the remote holds (one
                            batched existence call under ``deadline_s``; 0 on any failure).
    on_lookup_found(ns, keys)  a lookup found some: fill in the background (fill_on_lookup).
    fill(ns, keys)          before a get: read the remote continuation of the local prefix
                            straight into fresh DRAM arena slots, verify, publish it as DRAM
                            blocks; waits at most ``read_deadline_s`` (a late read still lands).
    prefetch(ns, keys)      fill in the background.
    flush(ns, keys, deadline_s)  -> (placed per key, timed out): wait until the blocks are
                            readable from the engine (queued for the writer now, whatever the
                            write policy, when this daemon holds them and the engine lacks them).
    read_bps(), stats_row(), close()

Writes are content-addressed: the writer asks which keys the remote already has (another host
stored them) and sends only the rest. Reads are verified (kvstore.tiers.remote.codec): a value
that is not exactly this block is a miss, counted, and removed from the remote.

Faults degrade to local: any engine error, timeout, refusal (pool busy, circuit open) is a miss
for reads and a skipped write — never an error for the get or put that triggered it. The
circuit breaker stops calling an engine that keeps failing and lets one probe through later.

Fills use the store's own put protocol through a session of the fill's own, which ends once
the fill's engine call has returned (a call past its deadline keeps the fill's slots until
then, and no longer: nothing leaks into a session that never ends): allocate (the keys
become invisible placeholders, so concurrent puts and fills of them skip), the engine writes into
the allocated slots, then commit — and blocks that failed are deleted in the same step of the
event loop, so a failed block is never visible to anyone.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvstore.core.errors import KVStoreError, ResourceExhausted
from kvstore.tiers.base import COMMITTED, NO_SLOT
from kvstore.core.keys import pack_keys
from kvstore.policies.write import REMOTE_WRITE_POLICIES, write_policy
from kvstore.tiers.remote.base import RemoteBackend, RemoteError
from kvstore.tiers.remote.breaker import CircuitBreaker
from kvstore.tiers.remote.codec import ReadStatus, encode_header, remote_key, verify

log = logging.getLogger("kvstore.remote")

WRITE_BATCH = 32             # blocks per background write (one existence call + one put)
MAX_BACKGROUND_FILLS = 8     # prefetch fills in flight at once; more are dropped (hints)
KNOWN_KEYS = 1 << 20         # remote keys remembered as stored (skip re-queueing them)
# A lookup's existence answers, reused by the get that usually follows it: the fill then skips
# its own existence call (an engine round trip: ~2 ms on Mooncake, a pipeline over every node
# on Redis). A stale "present" costs nothing but a miss (the batched read reports the key
# missing); a stale "absent" only a recompute the lookup already told the caller to expect.
PROBE_TTL_S = 1.0
# Bytes per engine read call within one fill (remote_read_chunk_bytes): each chunk is verified
# while the next transfers. Large, because a call has a fixed cost (Mooncake over TCP: ~4 ms,
# the transfer of ~5 MB here) that the overlap must repay: xxh3 runs at ~13 GB/s against the
# transfer's ~1.2 GB/s, so only a chunk of well over 50 MB hides more than a call costs.
READ_CHUNK_BYTES = 256 << 20
VERIFY_THREADS = 2
PROBED_KEYS = 1 << 16
# The planner's figure before the first remote read was measured: conservative for a TCP
# transport (Mooncake measured ~0.7 GB/s, Redis ~0.6 GB/s on a loaded 2-core box).
UNMEASURED_READ_BPS = 300e6


class RemoteUnavailable(Exception):
    """A remote call was refused, failed or missed its deadline: the caller degrades."""


@dataclass
class RemoteCounters:
    hits: int = 0                 # blocks read from the remote, verified, served
    misses: int = 0               # blocks looked for past the local prefix and not served
    bytes_in: int = 0             # block bytes written to the remote
    bytes_out: int = 0            # block bytes read from the remote
    writes: int = 0               # blocks written
    writes_deduplicated: int = 0  # blocks the remote already had (another host stored them)
    writes_skipped: int = 0       # queue full, or remote unavailable
    writes_failed: int = 0        # the engine refused the put (pool full)
    checksum_failures: int = 0    # remote values read whole that were not this block: removed
    errors: int = 0               # engine calls, and block reads within one, that failed
    timeouts: int = 0             # waits that missed their deadline
    refused: int = 0              # calls not made: circuit open or thread pool busy


class RemoteTier:
    """The cluster tier (kvstore.tiers.base.Tier). ``store``: the daemon's BlockStore, handed in
    by the composition root — the tier fills DRAM through the store's own put protocol."""

    name = "REMOTE"

    def __init__(self, store, backend: RemoteBackend, url: str, *,
                 policy: str = "write_through", write_hits: int = 1, deadline_s: float = 0.2,
                 read_deadline_s: float = 2.0, threads: int = 4, queue_blocks: int = 256,
                 read_chunk_bytes: int = READ_CHUNK_BYTES, fill_on_lookup: bool = True,
                 flush_deadline_s: float = 10.0, breaker: CircuitBreaker | None = None):
        try:   # kvstore.policies.write: the same policies as the SSD tier's, but write_back
            self._write_policy = write_policy(policy, write_hits, REMOTE_WRITE_POLICIES)
        except ValueError as exc:
            raise ValueError(f"remote policy {exc}") from None
        self.store = store
        self.backend = backend
        self.url = url
        self.policy = policy
        self.write_hits = write_hits
        self.deadline_s = deadline_s
        self.read_deadline_s = read_deadline_s
        self.queue_blocks = queue_blocks
        self.read_chunk_bytes = read_chunk_bytes
        self.fill_on_lookup = fill_on_lookup
        self.flush_deadline_s = flush_deadline_s
        self.breaker = breaker or CircuitBreaker()
        self.counters = RemoteCounters()
        backend.attach(store.dram.buffer)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvstore-remote")
        self._verifier = ThreadPoolExecutor(VERIFY_THREADS,
                                            thread_name_prefix="kvstore-remote-verify")
        self._read_lane = asyncio.Lock()
        self._max_inflight = threads * 2
        self._inflight = 0
        self._queue: collections.deque[int] = collections.deque()   # pinned block ids
        self._queued: set[int] = set()
        self._writer: asyncio.Task | None = None
        # set (and replaced) after every batch the writer finished: flush() waits on it
        self._wrote = asyncio.Event()
        self._filling: dict[tuple[int, bytes], asyncio.Future] = {}
        self._background: set[asyncio.Task] = set()
        self._known: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._probed: collections.OrderedDict[str, tuple[bool, float]] = \
            collections.OrderedDict()
        self._read_bw = 0.0
        self._write_bw = 0.0
        self._closed = False

    # -- engine calls ---------------------------------------------------------------------------
    async def _call(self, fn, *args, deadline_s: float | None = None,
                    late: list | None = None):
        """Run ``fn`` in the pool; its result, or RemoteUnavailable (refused, failed, late).
        A late call keeps running; its outcome still feeds the breaker, and its future is
        appended to ``late`` (the caller learns when it has returned)."""
        if self._closed or self._inflight >= self._max_inflight or not self.breaker.allow():
            self.counters.refused += 1
            raise RemoteUnavailable("remote not called")
        self._inflight += 1
        fut = asyncio.wrap_future(self._pool.submit(fn, *args))
        fut.add_done_callback(self._finished)
        try:
            if deadline_s is None:
                return await asyncio.shield(fut)
            return await asyncio.wait_for(asyncio.shield(fut), deadline_s)
        except asyncio.TimeoutError:
            self.counters.timeouts += 1
            self.breaker.failure()
            if late is not None:
                late.append(fut)
            raise RemoteUnavailable(f"remote call missed its {deadline_s:g}s deadline") from None
        except RemoteError as exc:
            raise RemoteUnavailable(str(exc)) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:      # a bug or an engine surprise: still only a miss
            raise RemoteUnavailable(repr(exc)) from None

    def _shutdown_pools(self) -> None:
        self._pool.shutdown(True)
        self._verifier.shutdown(True)

    def _finished(self, fut: asyncio.Future) -> None:
        self._inflight -= 1
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self.breaker.success()
            return
        self.counters.errors += 1
        before = self.breaker.state
        self.breaker.failure()
        if self.breaker.state != before:
            log.warning("remote %s: %s; circuit %s (calls resume after a probe succeeds)",
                        self.url, exc, self.breaker.state)
        elif not isinstance(exc, RemoteError):
            log.error("remote %s: unexpected %r", self.url, exc)

    # -- lookup ---------------------------------------------------------------------------------
    async def probe(self, namespace_id: bytes, keys_blob: bytes, n_local: int) -> int:
        """How many blocks after the first ``n_local`` the remote holds (a prefix of them)."""
        try:
            ns, keys, _ = self.store.cached_prefix(namespace_id, keys_blob)
        except KVStoreError:
            return 0
        rest = keys[n_local:]
        if not rest:
            return 0
        rkeys = [remote_key(ns.namespace_id, k) for k in rest]
        try:
            present = await self._call(self.backend.exists, rkeys, deadline_s=self.deadline_s)
        except RemoteUnavailable:
            return 0
        m = _leading(present)
        self._remember_probe(rkeys[:m + 1], present[:m + 1])
        return m

    def _remember_probe(self, rkeys: list[str], present: list[bool]) -> None:
        now = time.monotonic()
        probed = self._probed
        for rk, p in zip(rkeys, present):
            probed[rk] = (bool(p), now)
            probed.move_to_end(rk)
        while len(probed) > PROBED_KEYS:
            probed.popitem(last=False)

    def _probed_prefix(self, rkeys: list[str]) -> int | None:
        """How many leading ``rkeys`` a recent lookup found present, if its answers cover the
        walk (up to an absent key or the end); None: ask the engine."""
        oldest = time.monotonic() - PROBE_TTL_S
        probed = self._probed
        for i, rk in enumerate(rkeys):
            seen = probed.get(rk)
            if seen is None or seen[1] < oldest:
                return None
            if not seen[0]:
                return i
        return len(rkeys)

    # -- read path ------------------------------------------------------------------------------
    async def fill(self, namespace_id: bytes, keys_blob: bytes,
                   for_get: bool = True) -> tuple[int, int]:
        """Bring the remote continuation of the local prefix into DRAM, waiting at most
        ``read_deadline_s``. Returns (n, m): n blocks were local, the next m were found
        remotely (those that passed verification are now DRAM blocks). Never raises for the
        remote; bad input is left for the get itself to report. ``for_get`` False: a
        background fill (lookup, prefetch), whose misses are left for the get to count."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            ns, keys, n = self.store.cached_prefix(namespace_id, keys_blob)
        except KVStoreError:
            return 0, 0
        rest = keys[n:]
        if not rest or self._closed:
            return n, 0
        rkeys = [remote_key(ns.namespace_id, k) for k in rest]
        m = self._probed_prefix(rkeys)
        if m is None:
            try:
                present = await self._call(self.backend.exists, rkeys,
                                           deadline_s=self.deadline_s)
            except RemoteUnavailable:
                self.counters.misses += len(rest) * for_get
                return n, 0
            m = _leading(present)
        # Misses are counted for gets only: a background fill (lookup, prefetch) is usually
        # followed by a get that counts the same blocks missing again.
        self.counters.misses += (len(rest) - m) * for_get
        if not m:
            return n, 0
        rest, rkeys = rest[:m], rkeys[:m]
        store = self.store
        # A session per fill: it ends when the fill's engine call has returned, and with it
        # anything of the fill's still held — slots of an allocation that expired while a
        # stalled call could still write into them come back then, never leak.
        sid = store.open_session("remote-fill", os.getpid()).session_id
        try:
            alloc_id, offsets = store.allocate(sid, ns.namespace_id, pack_keys(rest),
                                               parent_key=keys[n - 1] if n else b"")
        except (ResourceExhausted, KVStoreError):
            store.close_session(sid, writes_ended=True)
            self.counters.misses += m * for_get  # no DRAM room (all leased): served locally later
            return n, m
        waits = [self._filling[(ns.index, k)] for k, off in zip(rest, offsets)
                 if off < 0 and (ns.index, k) in self._filling]
        take = [i for i, off in enumerate(offsets) if off >= 0]
        if take:
            done = loop.create_future()
            mine = [rest[i] for i in take]
            for k in mine:
                self._filling[(ns.index, k)] = done
            task = loop.create_task(self._read(ns, sid, alloc_id, mine,
                                               [rkeys[i] for i in take],
                                               [offsets[i] for i in take], done, for_get))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            waits.append(done)
        else:
            store.close_session(sid, writes_ended=True)
        if waits:
            left = self.read_deadline_s - (loop.time() - t0)
            _, pending = await asyncio.wait(waits, timeout=max(left, 0.0))
            if pending:
                self.counters.timeouts += 1
                self.breaker.failure()
        return n, m

    async def _read(self, ns, sid: int, alloc_id: int, keys: list[bytes], rkeys: list[str],
                    offsets: list[int], done: asyncio.Future, for_get: bool = True) -> None:
        bb = ns.layout.block_bytes
        late: list = []
        try:
            statuses = await self._read_in_lane(ns, keys, rkeys, offsets, bb, late)
            if late:
                # past its deadline: misses now; the slots stay with the fill's session
                # (the call may still write into them) until the call has returned
                self.counters.misses += len(keys) * for_get
            else:
                self._publish(ns, sid, alloc_id, keys, rkeys, statuses, for_get)
        finally:
            for k in keys:
                self._filling.pop((ns.index, k), None)
            if not done.done():
                done.set_result(None)
            if late:
                late[0].add_done_callback(
                    lambda _: self.store.close_session(sid, writes_ended=True))
            else:
                self.store.close_session(sid, writes_ended=True)

    async def _read_in_lane(self, ns, keys, rkeys, offsets, bb,
                            late: list) -> list[ReadStatus]:
        """The engine reads of one fill, in the read lane; then their verification.

        The lane (FIFO) lets one fill's engine reads run at a time: concurrent fills (gets of
        several clients, a lookup's fill and a prefetch) then finish one after another instead
        of all at the end, and the engine's bandwidth is not split between them (measured: 4
        parallel calls of a quarter of a batch were slower than one call; decisions.md 27). The
        lane is left as soon as the reads are done, so the next fill's transfer overlaps this
        fill's verification; the wait for it is bounded (a stuck engine call must not make
        fills pile up holding DRAM slots). The engine reads have a deadline too
        (``read_deadline_s``): past it the fill is misses, and the still-running call's future
        is appended to ``late`` — the caller must keep the slots until it has returned."""
        missing = [ReadStatus.MISSING] * len(keys)
        try:
            await asyncio.wait_for(self._read_lane.acquire(), self.read_deadline_s)
        except asyncio.TimeoutError:
            self.counters.timeouts += 1
            return missing
        try:
            t0 = time.monotonic()
            try:
                verifying, n_read, exc = await self._call(
                    self._read_chunks, rkeys, keys, ns.namespace_id, offsets, bb,
                    deadline_s=self.read_deadline_s, late=late)
            except RemoteUnavailable:
                return missing
        finally:
            self._read_lane.release()
        if exc is not None:      # a later chunk failed: the chunks before it still count
            self.counters.errors += 1
            self.breaker.failure()
            log.warning("remote %s: read failed after %d of %d blocks: %s", self.url,
                        n_read, len(keys), exc)
        statuses: list[ReadStatus] = []
        t1 = time.monotonic()
        try:
            for chunk in verifying:
                statuses.extend(await asyncio.wrap_future(chunk))
        except Exception as exc:     # a bug in verification: nothing after it is served
            log.error("remote %s: verification failed: %r", self.url, exc)
        log.debug("remote fill of %d blocks: reads %.1f ms, then verification %.1f ms",
                  len(keys), (t1 - t0) * 1e3, (time.monotonic() - t1) * 1e3)
        statuses.extend(missing[len(statuses):])
        n_ok = sum(s == ReadStatus.OK for s in statuses)
        if n_ok:
            self._read_bw = _ewma(self._read_bw, n_ok * bb, time.monotonic() - t0)
        return statuses

    def _read_chunks(self, rkeys, keys, namespace_id, offsets, bb):
        """(pool thread) Read the blocks into their slots, read_chunk_bytes per engine call,
        handing each chunk to the verifier threads while the next one transfers (the engine
        call releases the GIL, as does xxh3 on a block: measured). Returns (futures of the
        statuses of consecutive pieces, blocks read, the exception that stopped the reads or
        None); raises if the first chunk failed."""
        step = max(1, self.read_chunk_bytes // bb)
        chunks: list = []
        for lo in range(0, len(rkeys), step):
            hi = min(lo + step, len(rkeys))
            t0 = time.perf_counter()
            try:
                headers = self.backend.get_into(rkeys[lo:hi], offsets[lo:hi], [bb] * (hi - lo))
            except Exception as exc:
                if not lo:
                    raise
                return chunks, lo, exc
            log.debug("remote read of %d blocks: engine %.1f ms", hi - lo,
                      (time.perf_counter() - t0) * 1e3)
            # verified in VERIFY_THREADS pieces at once: the box's other core hashes too
            piece = -(-(hi - lo) // VERIFY_THREADS)
            for p in range(lo, hi, piece):
                q = min(p + piece, hi)
                chunks.append(self._verifier.submit(self._verify_chunk, headers[p - lo:q - lo],
                                                    keys[p:q], namespace_id, offsets[p:q], bb))
        return chunks, len(rkeys), None

    def _verify_chunk(self, headers, keys, namespace_id, offsets, bb) -> list[ReadStatus]:
        """(verifier thread) Check every block of a chunk against its header."""
        buf = self.store.dram.buffer
        return [verify(h, k, namespace_id, buf[off:off + bb])
                for h, k, off in zip(headers, keys, offsets)]

    def _publish(self, ns, sid, alloc_id, keys, rkeys, statuses, for_get: bool = True) -> None:
        """Commit the fill's verified blocks only, once every read finished: the failed ones
        are dropped unpublished. (Committing all and deleting the failed ones in the same step
        hid them from the daemon's own readers, not from the index snapshot, which same-host
        clients read while the daemon writes it.)"""
        store = self.store
        ok = [s == ReadStatus.OK for s in statuses]
        committed: list[int] = []
        try:
            if any(ok):
                store.commit(sid, alloc_id, keep=ok, committed_out=committed)
            else:
                store.commit(sid, alloc_id, abort=True)
        except KVStoreError:
            return    # the allocation ended meanwhile (daemon stopping): nothing published
        if committed and store.ssd is not None:
            # Verified remote blocks are committed blocks like any other: the SSD write policy
            # applies, so they survive a restart here (and the loss of their remote replica).
            self._spawn(store.ssd.persist(committed))
        n_ok = sum(ok)
        c = self.counters
        c.hits += n_ok
        c.misses += (len(keys) - n_ok) * for_get
        c.bytes_out += n_ok * ns.layout.block_bytes
        for rk, good in zip(rkeys, ok):
            if good:
                self._remember(rk)
            else:
                self._probed.pop(rk, None)    # the read did not find it: ask the engine next
        # a failed read is a miss and an error, never a removal: the value is likely intact
        c.errors += sum(s == ReadStatus.FAILED for s in statuses)
        bad = [rk for rk, s in zip(rkeys, statuses) if s == ReadStatus.CORRUPT]
        if bad:
            c.checksum_failures += len(bad)
            log.warning("remote %s: %d values failed verification (e.g. %s): not served, "
                        "removed", self.url, len(bad), bad[0][:40])
            self._spawn(self._remove(bad))

    async def _remove(self, rkeys: list[str]) -> None:
        try:
            await self._call(self.backend.remove, rkeys)
        except RemoteUnavailable:
            pass
        for rk in rkeys:
            self._known.pop(rk, None)
            self._probed.pop(rk, None)

    def on_lookup_found(self, namespace_id: bytes, keys_blob: bytes) -> None:
        """A lookup found blocks here (probe > 0). With ``fill_on_lookup``, start reading
        them into DRAM now, in the background (the lookup answers without waiting): a lookup
        is how an engine decides to load a prefix, so the get usually follows, and finds the
        blocks arrived or arriving (it waits for a fill in flight rather than reading again)
        instead of starting the transfer itself. The cost when no get follows: the transfer,
        and DRAM room the fill takes from colder blocks (like a prefetch; bounded, as
        prefetches are, by MAX_BACKGROUND_FILLS). A lookup that finds them local again
        reads nothing."""
        if self.fill_on_lookup:
            self.prefetch(namespace_id, keys_blob)

    def prefetch(self, namespace_id: bytes, keys_blob: bytes) -> None:
        """A hint: fill in the background (dropped when too many fills are in flight)."""
        if self._closed or len(self._background) >= MAX_BACKGROUND_FILLS:
            return
        self._spawn(self.fill(namespace_id, keys_blob, for_get=False))

    # -- write path -----------------------------------------------------------------------------
    def on_commit(self, bids: list[int]) -> None:
        if self._write_policy.on_commit:
            self._enqueue(bids)

    def on_hits(self, bids: list[int]) -> None:
        idx = self.store.table
        hits = idx.hits[bids]
        if not self._write_policy.due(hits).any():
            return
        due = []
        for b, is_due in zip(bids, self._write_policy.due(hits).tolist()):
            if is_due and b not in self._queued:
                ns = self.store.table.namespace_of(b)
                if remote_key(ns.namespace_id, idx.key_of(b)) not in self._known:
                    due.append(b)
        if due:
            self._enqueue(due)

    def _enqueue(self, bids: list[int]) -> None:
        if self._closed:
            return
        idx = self.store.table
        take = []
        for b in bids:
            if b in self._queued or idx.dram[b] == NO_SLOT:
                continue
            if len(self._queue) + len(take) >= self.queue_blocks:
                self.counters.writes_skipped += 1
                continue
            take.append(b)
        if not take:
            return
        self.store.table.pin(take)    # the slot must hold these bytes until the writer sent them
        self._queue.extend(take)
        self._queued.update(take)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        store, idx = self.store, self.store.table
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(WRITE_BATCH, len(self._queue)))]
            try:
                live = [b for b in batch if idx.state[b] == COMMITTED and idx.dram[b] != NO_SLOT]
                items = []
                for b in live:
                    ns = store.table.namespace_of(b)
                    key = idx.key_of(b)
                    items.append((remote_key(ns.namespace_id, key), key, ns.namespace_id,
                                  int(idx.dram[b]), ns.layout.block_bytes))
                if not items:
                    continue
                t0 = time.monotonic()
                try:
                    sent, present, failed, skipped = await self._call(self._write_batch, items)
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
                    self._write_bw = _ewma(self._write_bw, nbytes, time.monotonic() - t0)
                for it, s, p in zip(items, sent, present):
                    if s or p:
                        self._remember(it[0])
            finally:
                self._queued.difference_update(batch)
                store.table.unpin(batch)
                wrote, self._wrote = self._wrote, asyncio.Event()
                wrote.set()

    def _write_batch(self, items):
        """(pool thread) Existence check, then put what the remote lacks, straight from the
        arena slots. Returns (sent, already there, refused, not sent: node unavailable) per
        item."""
        rkeys = [it[0] for it in items]
        present = self.backend.exists(rkeys)
        todo = [i for i, p in enumerate(present) if not p]
        sent = [False] * len(items)
        failed = [False] * len(items)
        skipped = [False] * len(items)
        if todo:
            buf = self.store.dram.buffer
            headers = [encode_header(items[i][1], items[i][2],
                                     buf[items[i][3]:items[i][3] + items[i][4]]) for i in todo]
            ok = self.backend.put([rkeys[i] for i in todo], headers,
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
        store, idx = self.store, self.store.table
        ns = store.namespace(namespace_id)
        keys = store.parse_keys(keys_blob)
        rkeys = [remote_key(ns.namespace_id, k) for k in keys]
        bids = idx.find_many(ns.index, keys).tolist() if keys else []
        known = self._known
        timed_out = False
        while True:
            todo = [b for b, rk in zip(bids, rkeys) if rk not in known and b >= 0
                    and idx.state[b] == COMMITTED and idx.dram[b] != NO_SLOT]
            self._enqueue([b for b in todo if b not in self._queued])
            waiting = [b for b in todo if b in self._queued]
            if not waiting or self._closed:
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
            if any(b not in self._queued and rk not in known
                   for b, rk in zip(bids, rkeys) if b in waiting):
                # a write was skipped (engine or node unavailable): retry, not in a hot loop
                await asyncio.sleep(min(0.05, max(end - loop.time(), 0)))
        rest = [i for i, rk in enumerate(rkeys) if rk not in known]
        if rest:     # held elsewhere, or written by another host: ask the engine once
            try:
                present = await self._call(self.backend.exists, [rkeys[i] for i in rest],
                                           deadline_s=max(min(self.deadline_s,
                                                              end - loop.time()), 0.01))
            except RemoteUnavailable:
                present = [False] * len(rest)
            for i, p in zip(rest, present):
                if p:
                    self._remember(rkeys[i])
        return [rk in known for rk in rkeys], timed_out

    def _remember(self, rkey: str) -> None:
        known = self._known
        known[rkey] = None
        known.move_to_end(rkey)
        if len(known) > KNOWN_KEYS:
            known.popitem(last=False)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- figures and shutdown -------------------------------------------------------------------
    def read_bps(self) -> float:
        """Measured remote read throughput (bytes/s, recent fills); UNMEASURED_READ_BPS
        before the first."""
        return self._read_bw or UNMEASURED_READ_BPS

    def queue_depth(self) -> int:
        return len(self._queue)

    # -- kvstore.tiers.base.Tier: the engine's capacity is not this daemon's to report ------------
    def capacity_bytes(self) -> int:
        return 0

    def used_bytes(self) -> int:
        return 0

    def blocks(self) -> int:
        return 0

    def forget(self, bid: int) -> None:
        """Remote values are content-addressed and shared by every daemon: nothing to free."""

    def stats_row(self):
        from kvstore.v1 import kvstore_pb2 as pb
        c = self.counters
        return pb.TierStats(
            tier=pb.TIER_REMOTE, hits=c.hits, misses=c.misses, bytes_in=c.bytes_in,
            bytes_out=c.bytes_out, checksum_failures=c.checksum_failures,
            io_errors=c.errors + c.writes_failed, read_bps=self._read_bw,
            write_bps=self._write_bw, queue_depth=len(self._queue),
            circuit_state=self.breaker.state, writes_skipped=c.writes_skipped,
            writes_deduplicated=c.writes_deduplicated, timeouts=c.timeouts, backend=self.url,
            remote_nodes=[pb.RemoteNode(node=n, circuit_state=st, errors=e, keys_unavailable=u)
                          for n, st, e, u in self.backend.nodes()])

    async def close(self, timeout_s: float = 10.0) -> bool:
        """Stop taking work, let queued writes finish, wait for engine calls in flight (they
        write into arena slots, which must outlive them) and close the engine client — all
        within ``timeout_s`` together. Returns False when engine calls or the client's close
        were still running at the deadline (an engine that is gone: Mooncake's client retries
        its unmount for ~15 s): they are left to a daemon thread, and the caller must exit
        the process without waiting for them (nor unmapping the arena under them)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        if self._writer is not None and not self._writer.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), (end - loop.time()) / 2)
            except asyncio.TimeoutError:
                log.warning("remote %s: %d queued blocks not written at shutdown", self.url,
                            len(self._queue))
        self._closed = True
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(end - loop.time(), 0) / 2)
        done = loop.create_future()

        def finish() -> None:      # a daemon thread: one stuck in the engine never holds exit
            try:
                self._shutdown_pools()
                self.backend.close()
            except Exception as exc:
                log.warning("remote %s: close: %s", self.url, exc)
            finally:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
        threading.Thread(target=finish, name="kvstore-remote-close", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), max(end - loop.time(), 0.01))
            return True
        except asyncio.TimeoutError:
            log.warning("remote %s: engine calls or the client's close still running after "
                        "%.1fs at shutdown (engine unreachable): exiting without them",
                        self.url, timeout_s)
            return False


def _leading(flags) -> int:
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


def _ewma(prev: float, nbytes: int, seconds: float) -> float:
    if nbytes <= 0 or seconds <= 0:
        return prev
    bw = nbytes / seconds
    w = min(1.0, nbytes / (64 << 20))   # weight by bytes: a one-block batch moves it little
    return bw if not prev else (1 - w) * prev + w * bw
