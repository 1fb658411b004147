"""The gRPC servicer: kvstore.v1 messages in and out. Each handler decodes its request, calls
the read path (kvstore.store.reads), the write path (kvstore.store.writes) or the store, and
encodes the answer; the orchestration of tiers lives in those paths, not here.

Domain errors become status codes with the store's message and their reason (kvstore.core.errors:
trailing metadata ``kvstore-reason``); anything else becomes INTERNAL with a log line, and the
daemon keeps serving everyone else.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Callable

from kvstore import __version__
from kvstore.access.status import abort
from kvstore.core.errors import InvalidArgument, KVStoreError, Reason
from kvstore.core.layout import KVLayout, LayoutError
from kvstore.planner.recompute import PrefillProfile
from kvstore.store.blockstore import BlockStore
from kvstore.store.reads import ReadPath
from kvstore.store.writes import WritePath
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
    """Each handler decodes its request, calls one method of the read path
    (kvstore.store.reads), the write path (kvstore.store.writes) or the store, and encodes the
    answer. The servicer orchestrates no tier: it imports none (tests/test_architecture.py)."""

    def __init__(self, store: BlockStore, reads: ReadPath, writes: WritePath,
                 max_message_bytes: int, stopping: asyncio.Event, metrics=None,
                 stats: Callable[[], pb.Stats] | None = None, index_path: str = ""):
        """``stats``: the counters-only Stats message (GetStats without ``metrics``)."""
        self.store = store
        self.reads = reads
        self.writes = writes
        self.max_message_bytes = max_message_bytes
        self._stopping = stopping
        self.metrics = metrics   # kvstore.metrics.model.Metrics; None: counters only
        self._stats = stats or functools.partial(stats_message, store)
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

    # -- the read path (kvstore.store.reads) -----------------------------------------------
    @unary
    async def Lookup(self, request, context):
        n, tiers = await self.reads.lookup(request.namespace_id, request.keys)
        return pb.LookupResponse(num_cached=n, tiers=[TIER_ENUM[t] for t in tiers])

    def _release_held_back(self, request) -> None:
        """End the leases a client held back for this call (release_lease_ids: copies it
        proved itself), before the call's own work; a lease that already ended is skipped."""
        ids, waited = request.release_lease_ids, request.release_waited_s
        if not ids:
            return
        if waited and len(waited) != len(ids):
            raise InvalidArgument(f"release_waited_s has {len(waited)} entries for "
                                  f"{len(ids)} release_lease_ids (one per lease, or none)")
        if any(not 0.0 <= w <= MAX_REPORTED_GET_S for w in waited):
            raise InvalidArgument(f"release_waited_s must be seconds in [0, "
                                  f"{MAX_REPORTED_GET_S:g}]")
        ended = set(self.reads.release_many(request.session_id, ids))
        if self.metrics is not None:
            for i, lid in enumerate(ids):
                if lid in ended:
                    self.metrics.get_finished(lid, waited[i] if waited else 0.0)

    @unary
    async def Acquire(self, request, context):
        self._release_held_back(request)
        got = await self.reads.get(request.session_id, request.namespace_id, request.keys,
                                   want_hbm=request.want_hbm)
        return pb.AcquireResponse(lease_id=got.lease.lease_id if got.lease else 0,
                                  offsets=got.offsets, generations=got.generations,
                                  tiers=[TIER_ENUM[t] for t in got.tiers],
                                  lease_timeout_s=self.reads.lease_timeout_s,
                                  hbm_offsets=got.hbm_offsets, hbm_fill=got.hbm_fill)

    async def AcquireLayers(self, request, context):
        """Acquire whose SSD blocks arrive layer by layer (kvstore.v1 AcquireLayersResponse):
        the lease first, then the layers in place as they land, then how many blocks verified.
        A client that stops listening ends its lease once the reads under way have landed."""
        try:
            self._release_held_back(request)
            lg = await self.reads.get_layers(request.session_id, request.namespace_id,
                                             request.keys)
        except KVStoreError as exc:
            await abort(context, exc)
            return
        got = lg.get
        lease = pb.AcquireResponse(
            lease_id=got.lease.lease_id if got.lease else 0, offsets=got.offsets,
            generations=got.generations, tiers=[TIER_ENUM[t] for t in got.tiers],
            lease_timeout_s=self.reads.lease_timeout_s)
        answered = False
        try:
            yield pb.AcquireLayersResponse(lease=lease, num_layers=lg.num_layers,
                                           layers_ready=0 if lg.streaming else lg.num_layers)
            while (ready := await lg.next_ready()) is not None:
                yield pb.AcquireLayersResponse(layers_ready=ready)
            try:
                verified = await lg.finish()
            except Exception:
                log.exception("internal error in AcquireLayers")
                await abort(context, KVStoreError("internal error in AcquireLayers; see the "
                                                  "daemon log", Reason.INTERNAL))
                return
            yield pb.AcquireLayersResponse(done=True, verified=verified,
                                           layers_ready=lg.num_layers)
            answered = True
        finally:
            if not answered:
                lg.abandon()

    async def ReadBlocks(self, request, context):
        try:
            blocks = self.reads.read_streamed(request.session_id, request.lease_id)
        except KVStoreError as exc:
            await abort(context, exc)
            return
        for i, data in blocks:   # copied block by block while the lease holds (blockstore.py)
            yield pb.BlockData(index=i, data=data)

    @unary
    def Release(self, request, context):
        self._release_held_back(request)
        if request.lease_id:
            self.reads.release(request.session_id, request.lease_id, request.hbm_filled)
        return pb.ReleaseResponse()

    @unary
    def ReportReads(self, request, context):
        """Lease-free DRAM reads, after the fact (ReadPath.report_reads)."""
        _check_read_report(request, self.store.max_batch_blocks)
        n = self.reads.report_reads(request.namespace_id, request.keys, request.misses,
                                    request.lookups)
        return pb.ReportReadsResponse(counted=n)

    @unary
    def Prefetch(self, request, context):
        out = self.reads.prefetch(request.session_id, request.namespace_id,
                                  [(it.keys, it.deadline_s) for it in request.items],
                                  request.grace_s, to_hbm=request.to_hbm)
        return pb.PrefetchResponse(prefetch_ids=[o[0] for o in out], blocks=[o[1] for o in out],
                                   to_promote=[o[2] for o in out])

    @unary
    def CancelPrefetch(self, request, context):
        n = self.reads.cancel_prefetch(request.session_id, list(request.prefetch_ids))
        return pb.CancelPrefetchResponse(cancelled=n)

    @unary
    async def PlanRecompute(self, request, context):
        pr = request.profile
        if not all(x >= 0 and x < float("inf") for x in (pr.c0, pr.c1, pr.c2, request.latency_s)):
            raise InvalidArgument("profile coefficients and latency_s must be finite and >= 0",
                                  Reason.BAD_ARGUMENT)
        got = await self.reads.plan(request.namespace_id, request.keys,
                                    PrefillProfile(pr.c0, pr.c1, pr.c2), request.latency_s)
        plan, bw, inf = got.plan, got.bandwidth, float("inf")
        return pb.PlanRecomputeResponse(
            num_cached=len(got.tiers), tiers=[TIER_ENUM[t] for t in got.tiers],
            recompute_tokens=plan.recompute_tokens, load_blocks_from=plan.load_blocks_from,
            predicted_s=min(plan.predicted_s, 1e30), load_all_s=min(plan.load_all_s, 1e30),
            recompute_all_s=min(plan.recompute_all_s, 1e30) if plan.recompute_all_s < inf else 1e30,
            dram_read_bps=bw["DRAM"], ssd_read_bps=bw["SSD"], remote_read_bps=bw["REMOTE"])

    # -- the write path (kvstore.store.writes) ---------------------------------------------
    @unary
    async def Allocate(self, request, context):
        alloc_id, offsets = await self.writes.allocate(request.session_id, request.namespace_id,
                                                       request.keys, request.parent_key)
        return pb.AllocateResponse(allocation_id=alloc_id, offsets=offsets)

    @unary
    def WriteBlocks(self, request, context):
        self.writes.write(request.session_id, request.allocation_id, request.first_index,
                          request.data)
        return pb.WriteBlocksResponse()

    @unary
    async def Commit(self, request, context):
        n = await self.writes.commit(request.session_id, request.allocation_id, request.abort)
        return pb.CommitResponse(committed=n)

    @unary
    async def Delete(self, request, context):
        return pb.DeleteResponse(deleted=await self.writes.delete(request.namespace_id,
                                                                  request.keys))

    @unary
    async def FlushRemote(self, request, context):
        """Answer once the blocks are readable from the cluster tier, or its deadline passed."""
        placed, timed_out = await self.writes.flush_remote(
            request.session_id, request.namespace_id, request.keys, request.deadline_s)
        return pb.FlushRemoteResponse(placed=placed, num_placed=sum(placed),
                                      timed_out=timed_out)

    # -- statistics and reports --------------------------------------------------------------
    @unary
    def GetStats(self, request, context):
        return self.metrics.snapshot() if self.metrics else self._stats()

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


def _check_read_report(request, max_batch_blocks: int) -> None:
    """Bounds of one ReportReads: a client reports what a few gets read, so anything larger is
    a bug or an attack on the counters."""
    if request.misses > MAX_REPORTED_MISSES:
        raise InvalidArgument(f"ReportReads(misses={request.misses}): one report may claim "
                              f"at most {MAX_REPORTED_MISSES} misses", Reason.BAD_ARGUMENT)
    if len(request.get_s) > max_batch_blocks or not all(
            0 <= s <= MAX_REPORTED_GET_S for s in request.get_s):
        raise InvalidArgument(f"ReportReads: get_s must hold at most max_batch_blocks="
                              f"{max_batch_blocks} times, each in [0, "
                              f"{MAX_REPORTED_GET_S:g}] s", Reason.BAD_ARGUMENT)
    if request.lookups > MAX_REPORTED_MISSES:
        raise InvalidArgument(f"ReportReads(lookups={request.lookups}): one report may "
                              f"claim at most {MAX_REPORTED_MISSES} lookups",
                              Reason.BAD_ARGUMENT)


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
