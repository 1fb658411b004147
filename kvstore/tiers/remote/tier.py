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
    read_bps(), queue_depth(), stats_row(), close()

The tier is three parts: the read path (kvstore.tiers.remote.fills), the write queue
(kvstore.tiers.remote.writes) and the engine calls they share (kvstore.tiers.remote.engine:
pool, deadlines, circuit breaker, counters). It never holds the store: the slots its fills land
in and the committed blocks it writes come through kvstore.tiers.remote.slots.FillSlots, which
the composition root hands it.

Reads are verified (kvstore.tiers.remote.codec): a value that is not exactly this block is a
miss, counted, and removed from the remote. Faults degrade to local: any engine error,
timeout, refusal (pool busy, circuit open) is a miss for reads and a skipped write — never an
error for the get or put that triggered it. The circuit breaker stops calling an engine that
keeps failing and lets one probe through later.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from kvstore.tiers.remote.base import RemoteBackend
from kvstore.tiers.remote.breaker import CircuitBreaker
from kvstore.tiers.remote.engine import EngineCalls
from kvstore.tiers.remote.fills import READ_CHUNK_BYTES, UNMEASURED_READ_BPS, RemoteFills
from kvstore.tiers.remote.slots import FillSlots
from kvstore.tiers.remote.writes import RemoteWrites

log = logging.getLogger("kvstore.remote")


class RemoteTier:
    """The cluster tier (kvstore.tiers.base.Tier). ``slots``: where fills land and what the
    writer reads (kvstore.tiers.remote.slots.FillSlots), handed in by the composition root."""

    name = "REMOTE"

    def __init__(self, slots: FillSlots, backend: RemoteBackend, url: str, *,
                 policy: str = "write_through", write_hits: int = 1, deadline_s: float = 0.2,
                 read_deadline_s: float = 2.0, threads: int = 4, queue_blocks: int = 256,
                 read_chunk_bytes: int = READ_CHUNK_BYTES, fill_on_lookup: bool = True,
                 flush_deadline_s: float = 10.0, breaker: CircuitBreaker | None = None):
        self.engine = EngineCalls(backend, url, threads, breaker)
        self.writes = RemoteWrites(self.engine, slots, policy=policy, write_hits=write_hits,
                                   queue_blocks=queue_blocks, deadline_s=deadline_s)
        self.fills = RemoteFills(self.engine, slots, deadline_s=deadline_s,
                                 read_deadline_s=read_deadline_s,
                                 read_chunk_bytes=read_chunk_bytes, fill_on_lookup=fill_on_lookup)
        self.backend = backend
        self.url = url
        self.policy = policy
        self.write_hits = write_hits
        self.deadline_s = deadline_s
        self.read_deadline_s = read_deadline_s
        self.queue_blocks = queue_blocks
        self.flush_deadline_s = flush_deadline_s
        self.breaker = self.engine.breaker
        self.counters = self.engine.counters
        backend.attach(slots.arena)

    # -- the read path (kvstore.tiers.remote.fills) ---------------------------------------------
    async def probe(self, namespace_id: bytes, keys_blob: bytes, n_local: int) -> int:
        """How many blocks after the first ``n_local`` the remote holds (a prefix of them)."""
        return await self.fills.probe(namespace_id, keys_blob, n_local)

    async def fill(self, namespace_id: bytes, keys_blob: bytes,
                   for_get: bool = True) -> tuple[int, int]:
        """See RemoteFills.fill: (n local, m found remotely); never raises for the remote."""
        return await self.fills.fill(namespace_id, keys_blob, for_get)

    def on_lookup_found(self, namespace_id: bytes, keys_blob: bytes) -> None:
        self.fills.on_lookup_found(namespace_id, keys_blob)

    def prefetch(self, namespace_id: bytes, keys_blob: bytes) -> None:
        self.fills.prefetch(namespace_id, keys_blob)

    # -- the write queue (kvstore.tiers.remote.writes) ------------------------------------------
    def on_commit(self, bids: list[int]) -> None:
        self.writes.on_commit(bids)

    def on_hits(self, bids: list[int]) -> None:
        self.writes.on_hits(bids)

    async def flush(self, namespace_id: bytes, keys_blob: bytes,
                    deadline_s: float) -> tuple[list[bool], bool]:
        """See RemoteWrites.flush: (placed per key, timed out)."""
        return await self.writes.flush(namespace_id, keys_blob, deadline_s)

    # -- figures and shutdown -------------------------------------------------------------------
    def read_bps(self) -> float:
        """Measured remote read throughput (bytes/s, recent fills); UNMEASURED_READ_BPS
        before the first."""
        return self.fills.read_bw or UNMEASURED_READ_BPS

    def queue_depth(self) -> int:
        return self.writes.queue_depth()

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
            io_errors=c.errors + c.writes_failed, read_bps=self.fills.read_bw,
            write_bps=self.writes.write_bw, queue_depth=self.writes.queue_depth(),
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
        if not await self.writes.drain((end - loop.time()) / 2):
            log.warning("remote %s: %d queued blocks not written at shutdown", self.url,
                        self.writes.queue_depth())
        self.engine.closed = True
        await self.engine.wait_background(max(end - loop.time(), 0) / 2)
        done = loop.create_future()

        def finish() -> None:      # a daemon thread: one stuck in the engine never holds exit
            try:
                self.engine.shutdown()
                self.fills.shutdown()
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

