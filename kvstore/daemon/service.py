"""The gRPC servicer: a thin translation between kvstore.v1 messages and BlockStore calls.

Domain errors become status codes with the store's message and their reason (kvstore.core.errors:
trailing metadata ``kvstore-reason``); anything else becomes INTERNAL with a log line, and the
daemon keeps serving everyone else.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging


from kvstore import __version__
from kvstore.access.status import abort
from kvstore.core.errors import FailedPrecondition, InvalidArgument, KVStoreError, Reason
from kvstore.core.layout import KVLayout, LayoutError
from kvstore.store.blockstore import BlockStore
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger("kvstore.daemon.service")

WATCH_MIN_INTERVAL_S = 0.05
# One ReportFallbacks may claim at most this many fallbacks and blocks: a client reports what one
# request recomputed, so anything larger is a bug or an attack on the counters.
MAX_REPORTED_FALLBACKS = 1 << 20
MAX_REPORTED_BLOCKS = 1 << 40
# One ReportReads covers at most max_batch_blocks keys read; misses likewise come from a few gets.
MAX_REPORTED_MISSES = 1 << 24
MAX_REPORTED_GET_S = 3600.0
MAX_FLUSH_DEADLINE_S = 600.0     # a FlushRemote holds a handler task: bounded like any wait
TIER_ENUM = {"HBM": pb.TIER_HBM, "DRAM": pb.TIER_DRAM, "SSD": pb.TIER_SSD,
             "REMOTE": pb.TIER_REMOTE}


def unary(fn):
    """Map domain errors to gRPC statuses for a unary handler, plain or async (SSD I/O)."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            result = fn(self, request, context)
            return await result if inspect.isawaitable(result) else result
        except KVStoreError as exc:
            await abort(context, exc)
        except LayoutError as exc:
            await abort(context, InvalidArgument(str(exc), Reason.BAD_LAYOUT))
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            await abort(context, KVStoreError(f"internal error in {fn.__name__}; see the daemon "
                                              "log", Reason.INTERNAL))
    return wrapper


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, max_message_bytes: int, stopping: asyncio.Event,
                 metrics=None, remote=None, prefetcher=None, index_path: str = "",
                 dram_read_bps: float = 0.0):
        self.store = store
        self.remote = remote     # kvstore.tiers.remote.RemoteTier; None: no cluster tier
        self.prefetcher = prefetcher   # kvstore.prefetch.prefetcher.Prefetcher; None: off
        self.max_message_bytes = max_message_bytes
        self._stopping = stopping
        self.metrics = metrics   # kvstore.metrics.model.Metrics; None: counters only
        self.dram_read_bps = dram_read_bps  # memcpy-scale figure for the planner
        self.index_path = index_path   # shared-memory index snapshot offered ("" for none)

    async def OpenSession(self, request, context):
        s = self.store.open_session(request.client_name, request.pid)
        arena, gens = self.store.dram.arena, self.store.dram.generations
        try:
            yield pb.SessionEvent(
                session_id=s.session_id,
                arena=pb.ArenaInfo(path=str(arena.path), size_bytes=arena.size_bytes,
                                   uuid=arena.uuid,
                                   generations_path=str(gens.path) if gens else "",
                                   index_path=self.index_path),
                daemon_version=__version__,
                max_batch_blocks=self.store.max_batch_blocks,
                max_message_bytes=self.max_message_bytes,
                hbm=self.store.hbm.pool.info() if self.store.hbm is not None else None,
            )
            await self._stopping.wait()
        finally:
            # Stopping: the daemon ends every session once in-flight calls drained (server.py),
            # so the leases of a draining stream or copy hold until then.
            if not self._stopping.is_set():
                self.store.close_session(s.session_id)

    @unary
    def RegisterNamespace(self, request, context):
        layout = KVLayout.from_proto(request.layout)
        ns = self.store.register_namespace(request.model_id, layout, request.tenant)
        return pb.RegisterNamespaceResponse(namespace_id=ns.namespace_id,
                                            block_bytes=layout.block_bytes,
                                            slot_bytes=layout.slot_bytes)

    @unary
    def Lookup(self, request, context):
        n, tiers = self.store.lookup(request.namespace_id, request.keys)
        if self.remote is not None and n < len(request.keys) // 16:
            return self._lookup_remote(request, n, tiers)
        return pb.LookupResponse(num_cached=n, tiers=[TIER_ENUM[t] for t in tiers])

    async def _lookup_remote(self, request, n: int, tiers: list[str]):
        """The prefix walk continues in the cluster tier (one batched call, short deadline).
        Blocks found there may start coming into DRAM at once (RemoteTier.on_lookup_found)."""
        m = await self.remote.probe(request.namespace_id, request.keys, n)
        if m:
            self.remote.on_lookup_found(request.namespace_id, request.keys)
        tiers = tiers + ["REMOTE"] * m
        return pb.LookupResponse(num_cached=len(tiers), tiers=[TIER_ENUM[t] for t in tiers])

    @unary
    async def Allocate(self, request, context):
        # Write-back: the victims' SSD writes are awaited here, off the event loop.
        await self.store.clean_room_for(request.session_id, request.namespace_id, request.keys)
        alloc_id, offsets = self.store.allocate(request.session_id, request.namespace_id,
                                                request.keys, request.parent_key)
        return pb.AllocateResponse(allocation_id=alloc_id, offsets=offsets)

    @unary
    def WriteBlocks(self, request, context):
        self.store.write_remote(request.session_id, request.allocation_id, request.first_index,
                                request.data)
        return pb.WriteBlocksResponse()

    @unary
    async def Commit(self, request, context):
        ssd = self.store.ssd
        committed: list[int] = []
        n = self.store.commit(request.session_id, request.allocation_id, request.abort,
                              committed_out=committed)
        if self.remote is not None and committed:
            self.remote.on_commit(committed)       # queued for the background writer
        if ssd is not None and committed:
            await ssd.persist(committed)   # write-through: answer once durable
        return pb.CommitResponse(committed=n)

    @unary
    async def Acquire(self, request, context):
        ssd = self.store.ssd
        want_hbm = request.want_hbm and self.store.hbm is not None
        promote: list[int] | None = [] if ssd is not None else None
        # A local miss continues in the cluster tier: its blocks land in DRAM before the acquire.
        n_local, n_remote = ((await self.remote.fill(request.namespace_id, request.keys))
                             if self.remote is not None else (0, 0))
        lease, offsets, tiers = self.store.acquire(request.session_id, request.namespace_id,
                                                   request.keys, promote_out=promote,
                                                   want_hbm=want_hbm)
        try:
            if lease is not None and self.prefetcher is not None:
                self.prefetcher.on_acquire(lease.block_ids)
            if lease is not None and ssd is not None:
                ssd.on_hits(lease.block_ids)
            if lease is not None and self.remote is not None:
                self.remote.on_hits(lease.block_ids)
                tiers = [("REMOTE" if n_local <= i < n_local + n_remote and t == "DRAM" else t)
                         for i, t in enumerate(tiers)]
            if promote:
                lease, offsets = await self.store.promote(request.session_id, lease, promote,
                                                          to_hbm=want_hbm)
                tiers = tiers[:len(offsets)]
            hbm_reads, hbm_fill = self.store.hbm_answer(lease) if want_hbm else ([], [])
        except BaseException:   # failed or cancelled (client deadline): no lease is answered
            self.store.abandon_lease(request.session_id, lease)
            raise
        return pb.AcquireResponse(lease_id=lease.lease_id if lease else 0, offsets=offsets,
                                  generations=self.store.slot_generations(offsets),
                                  tiers=[TIER_ENUM[t] for t in tiers],
                                  lease_timeout_s=self.store.lease_timeout_s,
                                  hbm_offsets=hbm_reads, hbm_fill=hbm_fill)

    async def ReadBlocks(self, request, context):
        try:
            blocks = self.store.read_remote(request.session_id, request.lease_id)
        except KVStoreError as exc:
            await abort(context, exc)
            return
        for i, data in blocks:   # copied block by block while the lease holds (store.py)
            yield pb.BlockData(index=i, data=data)

    @unary
    def Release(self, request, context):
        self.store.release(request.session_id, request.lease_id, request.hbm_filled)
        return pb.ReleaseResponse()

    @unary
    async def Delete(self, request, context):
        n = self.store.delete(request.namespace_id, request.keys)
        if self.store.ssd is not None:
            await self.store.ssd.sync_journal()   # a delete that answered stays deleted
        return pb.DeleteResponse(deleted=n)

    @unary
    def GetStats(self, request, context):
        return self.metrics.snapshot() if self.metrics else self._stats()

    def _stats(self) -> pb.Stats:
        return stats_message(self.store, self.prefetcher, self.remote)

    async def WatchStats(self, request, context):
        interval_s = request.interval_s or 1.0
        if not interval_s >= WATCH_MIN_INTERVAL_S:
            await abort(context, InvalidArgument(
                f"interval_s must be >= {WATCH_MIN_INTERVAL_S}, got {interval_s}",
                Reason.BAD_ARGUMENT))
        while not self._stopping.is_set():
            yield self.metrics.snapshot() if self.metrics else self._stats()
            # Wake at the interval, or at once when the daemon stops: the stream then ends OK.
            try:
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    @unary
    def ReportFallbacks(self, request, context):
        if request.count > MAX_REPORTED_FALLBACKS or request.blocks > MAX_REPORTED_BLOCKS:
            raise InvalidArgument(
                f"ReportFallbacks(count={request.count}, blocks={request.blocks}): one report "
                f"may claim at most {MAX_REPORTED_FALLBACKS} fallbacks and "
                f"{MAX_REPORTED_BLOCKS} blocks", Reason.BAD_ARGUMENT)
        if self.metrics is not None:
            self.metrics.fallbacks_reported(request.count, request.blocks)
        if request.count:
            log.info("client reported %d recompute fallbacks (%d blocks)%s", request.count,
                     request.blocks, f": {request.reason[:200]}" if request.reason else "")
        return pb.ReportFallbacksResponse()

    @unary
    def ReportReads(self, request, context):
        """Lease-free DRAM reads, after the fact: accounted as an acquire's DRAM hits are
        (BlockStore.report_reads), then the same after-get hooks as Acquire runs."""
        if request.misses > MAX_REPORTED_MISSES:
            raise InvalidArgument(f"ReportReads(misses={request.misses}): one report may claim "
                                  f"at most {MAX_REPORTED_MISSES} misses", Reason.BAD_ARGUMENT)
        if len(request.get_s) > self.store.max_batch_blocks or not all(
                0 <= s <= MAX_REPORTED_GET_S for s in request.get_s):
            raise InvalidArgument(f"ReportReads: get_s must hold at most max_batch_blocks="
                                  f"{self.store.max_batch_blocks} times, each in [0, "
                                  f"{MAX_REPORTED_GET_S:g}] s", Reason.BAD_ARGUMENT)
        if request.lookups > MAX_REPORTED_MISSES:
            raise InvalidArgument(f"ReportReads(lookups={request.lookups}): one report may "
                                  f"claim at most {MAX_REPORTED_MISSES} lookups",
                                  Reason.BAD_ARGUMENT)
        bids = self.store.report_reads(request.namespace_id, request.keys, request.misses,
                                       request.lookups)
        if bids:
            if self.prefetcher is not None:
                self.prefetcher.on_acquire(bids)
            if self.store.ssd is not None:
                self.store.ssd.on_hits(bids)
            if self.remote is not None:
                self.remote.on_hits(bids)
        return pb.ReportReadsResponse(counted=len(bids))


    @unary
    async def FlushRemote(self, request, context):
        """Answer once the blocks are readable from the cluster tier (RemoteTier.flush), or
        its deadline passed."""
        remote = self.remote
        if remote is None:
            raise FailedPrecondition("this daemon has no cluster tier (--remote): nothing is "
                                     "placed remotely", Reason.NOT_ENABLED)
        deadline_s = request.deadline_s or remote.flush_deadline_s
        if not 0 <= deadline_s <= MAX_FLUSH_DEADLINE_S:
            raise InvalidArgument(f"deadline_s must be in [0, {MAX_FLUSH_DEADLINE_S:g}] s, got "
                                  f"{request.deadline_s}", Reason.BAD_ARGUMENT)
        self.store.session(request.session_id)
        placed, timed_out = await remote.flush(request.namespace_id, request.keys, deadline_s)
        return pb.FlushRemoteResponse(placed=placed, num_placed=sum(placed),
                                      timed_out=timed_out)

    # -- prefetch and the recompute planner (kvstore/prefetch/prefetcher.py, kvstore/planner/recompute.py) ----------
    @unary
    def Prefetch(self, request, context):
        pf = self.prefetcher
        if pf is None:
            raise FailedPrecondition("prefetch is not enabled in this daemon", Reason.NOT_ENABLED)
        if self.remote is not None:
            for it in request.items:
                self.remote.prefetch(request.namespace_id, it.keys)
        out = pf.submit(request.session_id, request.namespace_id,
                        [(it.keys, it.deadline_s) for it in request.items], request.grace_s,
                        to_hbm=request.to_hbm and self.store.hbm is not None)
        return pb.PrefetchResponse(prefetch_ids=[o[0] for o in out], blocks=[o[1] for o in out],
                                   to_promote=[o[2] for o in out])

    @unary
    def CancelPrefetch(self, request, context):
        pf = self.prefetcher
        n = pf.cancel(request.session_id, list(request.prefetch_ids)) if pf else 0
        return pb.CancelPrefetchResponse(cancelled=n)

    @unary
    async def PlanRecompute(self, request, context):
        from kvstore.planner.recompute import PrefillProfile, plan_recompute

        pr = request.profile
        profile = PrefillProfile(pr.c0, pr.c1, pr.c2)
        if not all(x >= 0 and x < float("inf") for x in (pr.c0, pr.c1, pr.c2, request.latency_s)):
            raise InvalidArgument("profile coefficients and latency_s must be finite and >= 0",
                                  Reason.BAD_ARGUMENT)
        ns = self.store.namespace(request.namespace_id)
        n, tiers = self.store.lookup(request.namespace_id, request.keys)
        if self.remote is not None:
            tiers = tiers + ["REMOTE"] * await self.remote.probe(request.namespace_id,
                                                                  request.keys, n)
            n = len(tiers)
        ssd = self.store.ssd
        ssd_bps = ssd.read_bps() if ssd is not None else 0.0
        if ssd is not None and not ssd_bps and "SSD" in tiers:
            # a cold daemon must not guess: measure on a few of the request's own SSD blocks
            _, _, bids = self.store.committed_prefix(request.namespace_id, request.keys)
            ssd_bps = await ssd.measure_read_bps(bids.tolist())
        # HBM copies always have a DRAM or SSD copy too; a client that reads HBM only gains
        bw = {"HBM": self.dram_read_bps, "DRAM": self.dram_read_bps, "SSD": ssd_bps,
              "REMOTE": self.remote.read_bps() if self.remote is not None else 0.0}
        plan = plan_recompute(tiers, ns.layout.block_tokens, ns.layout.block_bytes, bw, profile,
                              request.latency_s)
        inf = float("inf")
        return pb.PlanRecomputeResponse(
            num_cached=n, tiers=[TIER_ENUM[t] for t in tiers],
            recompute_tokens=plan.recompute_tokens, load_blocks_from=plan.load_blocks_from,
            predicted_s=min(plan.predicted_s, 1e30), load_all_s=min(plan.load_all_s, 1e30),
            recompute_all_s=min(plan.recompute_all_s, 1e30) if plan.recompute_all_s < inf else 1e30,
            dram_read_bps=bw["DRAM"], ssd_read_bps=bw["SSD"], remote_read_bps=bw["REMOTE"])


def stats_message(store: BlockStore, prefetcher=None, remote=None, events=None) -> pb.Stats:
    """The counters-only Stats message: one row per tier (kvstore.tiers.base.Tier.stats_row,
    fastest first, then the cluster tier), namespaces, sessions, prefetch outcomes."""
    tiers = [t.stats_row() for t in store.tiers()]
    if remote is not None:
        tiers.append(remote.stats_row())
    namespaces = [pb.NamespaceStats(namespace_id=ns.namespace_id, model_id=ns.model_id,
                                    tenant=ns.tenant, blocks=n, bytes=b)
                  for ns, n, b in store.namespace_usage()]
    k = store.counters
    st = pb.Stats(tiers=tiers, namespaces=namespaces, sessions=len(store.sessions),
                  active_leases=store.active_leases(), uptime_s=store.uptime_s(),
                  daemon_version=__version__, lookups=k.lookups,
                  puts_rejected=k.puts_rejected, leases_expired=k.leases_expired,
                  sessions_reclaimed=k.sessions_reclaimed, reads_reported=k.reads_reported,
                  quarantined_bytes=store.quarantined_bytes())
    pf = prefetcher
    if pf is not None:
        c = pf.counters
        st.prefetch_issued, st.prefetch_cancelled = c.issued, c.cancelled
        st.prefetch_on_time, st.prefetch_late, st.prefetch_wasted = c.on_time, c.late, c.wasted
        st.prefetch_bytes_promoted, st.prefetch_pending = c.bytes_promoted, pf.pending
    if events is not None:
        st.kv_events_published, st.kv_events_dropped = events.published(), events.dropped()
    return st
