"""The remote tier's read path: lookups that continue in the engine, and fills — the remote
continuation of a local prefix read straight into fresh DRAM arena slots, verified, published.

    probe(ns, keys, n)      -> m: after n local blocks, how many more the remote holds (one
                            batched existence call under ``deadline_s``; 0 on any failure).
    fill(ns, keys)          before a get: read the remote continuation into DRAM, waiting at
                            most ``read_deadline_s`` (a late read still lands).
    prefetch(ns, keys)      fill in the background (a hint: dropped when too many are in flight).

A fill, step by step (the slots come from kvstore.tiers.remote.slots.FillSlots, never from the
store itself):

1. ``prefix``: how many keys are local already; the rest is the remote's to answer.
2. existence: a recent probe's answers (PROBE_TTL_S), else one batched ``exists`` call.
3. ``open_fill``: fresh slots for the found keys (invisible placeholders: concurrent puts and
   fills skip them; a key another fill is reading is waited for, not read twice).
4. the engine reads into the slots, ``read_chunk_bytes`` per call, one fill at a time (the
   read lane); each chunk is verified (header, key-seeded xxh3) while the next transfers.
5. ``publish`` the verified blocks only (the others are dropped unpublished), then ``persist``
   them (the SSD write policy). A value read whole that is not the block is counted and
   removed from the engine; a failed transfer is a miss, never a removal.
6. ``close`` once the engine call has returned: a call past its deadline keeps the fill's
   slots until then, and no longer.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from kvstore.core.errors import KVStoreError
from kvstore.tiers.remote.codec import ReadStatus, remote_key, verify
from kvstore.tiers.remote.engine import EngineCalls, RemoteUnavailable, ewma
from kvstore.tiers.remote.slots import Fill, FillSlots, SlotNamespace

log = logging.getLogger("kvstore.remote")

MAX_BACKGROUND_FILLS = 8     # prefetch fills in flight at once; more are dropped (hints)
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


class RemoteFills:
    """Lookups and fills of the cluster tier (see the module docstring)."""

    def __init__(self, engine: EngineCalls, slots: FillSlots, *, deadline_s: float,
                 read_deadline_s: float, read_chunk_bytes: int, fill_on_lookup: bool):
        self.engine = engine
        self.slots = slots
        self.deadline_s = deadline_s
        self.read_deadline_s = read_deadline_s
        self.read_chunk_bytes = read_chunk_bytes
        self.fill_on_lookup = fill_on_lookup
        self.counters = engine.counters
        self._verifier = ThreadPoolExecutor(VERIFY_THREADS,
                                            thread_name_prefix="kvstore-remote-verify")
        self._read_lane = asyncio.Lock()
        self._filling: dict[tuple[bytes, bytes], asyncio.Future] = {}
        self._probed: collections.OrderedDict[str, tuple[bool, float]] = \
            collections.OrderedDict()
        self.read_bw = 0.0

    def shutdown(self) -> None:
        """(any thread) Wait for verifications in flight."""
        self._verifier.shutdown(True)

    # -- lookup ---------------------------------------------------------------------------------
    async def probe(self, namespace_id: bytes, keys_blob: bytes, n_local: int) -> int:
        """How many blocks after the first ``n_local`` the remote holds (a prefix of them)."""
        try:
            ns, keys, _ = self.slots.prefix(namespace_id, keys_blob)
        except KVStoreError:
            return 0
        rest = keys[n_local:]
        if not rest:
            return 0
        rkeys = [remote_key(ns.namespace_id, k) for k in rest]
        try:
            present = await self.engine.call(self.engine.backend.exists, rkeys, deadline_s=self.deadline_s)
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
            ns, keys, n = self.slots.prefix(namespace_id, keys_blob)
        except KVStoreError:
            return 0, 0
        rest = keys[n:]
        if not rest or self.engine.closed:
            return n, 0
        rkeys = [remote_key(ns.namespace_id, k) for k in rest]
        m = self._probed_prefix(rkeys)
        if m is None:
            try:
                present = await self.engine.call(self.engine.backend.exists, rkeys,
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
        # The fill's slots are held until its engine call has returned (fill.close), and no
        # longer: slots of a fill whose call outlived its deadline come back then, never leak.
        try:
            fill = await self.slots.open_fill(ns, rest, keys[n - 1] if n else b"")
        except KVStoreError:
            self.counters.misses += m * for_get  # no DRAM room (all leased): served locally later
            return n, m
        offsets = fill.offsets
        waits = [self._filling[(ns.namespace_id, k)] for k, off in zip(rest, offsets)
                 if off < 0 and (ns.namespace_id, k) in self._filling]
        take = [i for i, off in enumerate(offsets) if off >= 0]
        if take:
            done = loop.create_future()
            mine = [rest[i] for i in take]
            for k in mine:
                self._filling[(ns.namespace_id, k)] = done
            self.engine.spawn(self._read(ns, fill, mine, [rkeys[i] for i in take],
                                         [offsets[i] for i in take], done, for_get))
            waits.append(done)
        else:
            fill.close()
        if waits:
            left = self.read_deadline_s - (loop.time() - t0)
            _, pending = await asyncio.wait(waits, timeout=max(left, 0.0))
            if pending:
                self.counters.timeouts += 1
                self.engine.breaker.failure()
        return n, m

    async def _read(self, ns: SlotNamespace, fill: Fill, keys: list[bytes], rkeys: list[str],
                    offsets: list[int], done: asyncio.Future, for_get: bool = True) -> None:
        bb = ns.block_bytes
        late: list = []
        try:
            statuses = await self._read_in_lane(ns, keys, rkeys, offsets, bb, late)
            if late:
                # past its deadline: misses now; the slots stay with the fill
                # (the call may still write into them) until the call has returned
                self.counters.misses += len(keys) * for_get
            else:
                self._publish(ns, fill, keys, rkeys, statuses, for_get)
        finally:
            for k in keys:
                self._filling.pop((ns.namespace_id, k), None)
            if not done.done():
                done.set_result(None)
            if late:
                late[0].add_done_callback(lambda _: fill.close())
            else:
                fill.close()

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
                verifying, n_read, exc = await self.engine.call(
                    self._read_chunks, rkeys, keys, ns.namespace_id, offsets, bb,
                    deadline_s=self.read_deadline_s, late=late, reader=True)
            except RemoteUnavailable:
                return missing
        finally:
            self._read_lane.release()
        if exc is not None:      # a later chunk failed: the chunks before it still count
            self.counters.errors += 1
            self.engine.breaker.failure()
            log.warning("remote %s: read failed after %d of %d blocks: %s", self.engine.url,
                        n_read, len(keys), exc)
        statuses: list[ReadStatus] = []
        t1 = time.monotonic()
        try:
            for chunk in verifying:
                statuses.extend(await asyncio.wrap_future(chunk))
        except Exception as exc:     # a bug in verification: nothing after it is served
            log.error("remote %s: verification failed: %r", self.engine.url, exc)
        log.debug("remote fill of %d blocks: reads %.1f ms, then verification %.1f ms",
                  len(keys), (t1 - t0) * 1e3, (time.monotonic() - t1) * 1e3)
        statuses.extend(missing[len(statuses):])
        n_ok = sum(s == ReadStatus.OK for s in statuses)
        if n_ok:
            self.read_bw = ewma(self.read_bw, n_ok * bb, time.monotonic() - t0)
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
                headers = self.engine.backend.get_into(rkeys[lo:hi], offsets[lo:hi], [bb] * (hi - lo))
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
        buf = self.slots.arena
        return [verify(h, k, namespace_id, buf[off:off + bb])
                for h, k, off in zip(headers, keys, offsets)]

    def _publish(self, ns: SlotNamespace, fill: Fill, keys, rkeys, statuses,
                 for_get: bool = True) -> None:
        """Publish the fill's verified blocks only, once every read finished: the failed ones
        are dropped unpublished. (Publishing all and deleting the failed ones in the same step
        hid them from the daemon's own readers, not from the index snapshot, which same-host
        clients read while the daemon writes it.)"""
        ok = [s == ReadStatus.OK for s in statuses]
        committed = fill.publish(ok)
        if committed:
            # Verified remote blocks are committed blocks like any other: the SSD write policy
            # applies, so they survive a restart here (and the loss of their remote replica).
            self.engine.spawn(self.slots.persist(committed))
        n_ok = sum(ok)
        c = self.counters
        c.hits += n_ok
        c.misses += (len(keys) - n_ok) * for_get
        c.bytes_out += n_ok * ns.block_bytes
        for rk, good in zip(rkeys, ok):
            if good:
                self.engine.remember(rk)
            else:
                self._probed.pop(rk, None)    # the read did not find it: ask the engine next
        # a failed read is a miss and an error, never a removal: the value is likely intact
        c.errors += sum(s == ReadStatus.FAILED for s in statuses)
        bad = [rk for rk, s in zip(rkeys, statuses) if s == ReadStatus.CORRUPT]
        if bad:
            c.checksum_failures += len(bad)
            log.warning("remote %s: %d values failed verification (e.g. %s): not served, "
                        "removed", self.engine.url, len(bad), bad[0][:40])
            self.engine.spawn(self._remove(bad))

    async def _remove(self, rkeys: list[str]) -> None:
        try:
            await self.engine.call(self.engine.backend.remove, rkeys)
        except RemoteUnavailable:
            pass
        for rk in rkeys:
            self.engine.forget(rk)
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
        if self.engine.closed or self.engine.background() >= MAX_BACKGROUND_FILLS:
            return
        self.engine.spawn(self.fill(namespace_id, keys_blob, for_get=False))



def _leading(flags) -> int:
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n
