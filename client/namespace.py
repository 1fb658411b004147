"""Namespaces: one model shard's blocks in the daemon, and the operations on them.

A Namespace belongs to a KVClient (client.namespace(...)); it derives keys, and runs lookup,
put, get, acquire (zero-copy leases), prefetch, planning and delete through the client's
session, re-registering itself after a daemon restart. Block bytes move through the client's
data path (client/datapath/), whichever medium the session was granted.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from kvstore.core import shmindex
from kvstore.client import cuda, quantized, transfer
from kvstore.client.datapath import Read
from kvstore.client.errors import (FailedPrecondition, InvalidArgument, KVStoreError, NotFound,
                                   Reason, StaleRead, Unavailable, from_rpc_error)
from kvstore.client.lease import ArenaRead, BlockAllocation, BlockLease, LayerLease
from kvstore.core.keys import chain_keys, namespace_digest, pack_keys
from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    from kvstore.client.sdk import KVClient

log = logging.getLogger("kvstore.client")

TIER_NAMES = {pb.TIER_HBM: "HBM", pb.TIER_DRAM: "DRAM", pb.TIER_SSD: "SSD",
              pb.TIER_REMOTE: "REMOTE"}
# The daemon forgot the session or the namespace (it restarted): register again and retry once.
_REREGISTER = (Reason.UNKNOWN_SESSION, Reason.UNKNOWN_NAMESPACE)
# flush_remote with no deadline of its own waits the daemon's remote_flush_deadline_s, which
# the client does not know: its call deadline allows for this much (the config's default).
FLUSH_DEADLINE_HINT_S = 10.0


@dataclass(frozen=True)
class LookupResult:
    num_cached: int          # blocks in the longest cached prefix
    tiers: list[str]         # tier of each of those blocks


class PendingPuts:
    """Read-your-writes: block key -> the future of the client's latest put of it still in
    flight. Reads (get, lookup, acquire, prefetch, plan) and deletes of a key wait for it. Keys
    are namespace-seeded hashes, so one table serves all of a client's namespaces."""

    def __init__(self):
        self._lock = threading.Lock()
        self._puts: dict[bytes, Future] = {}

    def track(self, keys: Sequence[bytes], fut: Future) -> None:
        keys = [bytes(k) for k in keys]
        with self._lock:
            for k in keys:
                self._puts[k] = fut

        def done(f, keys=keys):
            with self._lock:
                for k in keys:
                    if self._puts.get(k) is f:
                        del self._puts[k]
        fut.add_done_callback(done)

    def of(self, keys: Sequence[bytes]) -> set[Future]:
        """The puts still in flight that store any of ``keys``."""
        with self._lock:
            if not self._puts:
                return set()
            return {f for f in map(self._puts.get, map(bytes, keys)) if f is not None}


@dataclass(frozen=True)
class PrefetchTicket:
    prefetch_id: int        # 0: nothing of the keys was cached
    blocks: int             # cached prefix length
    to_promote: int         # of which on SSD only (being read into DRAM)


@dataclass(frozen=True)
class RemotePlacement:
    """What ``Namespace.flush_remote`` found: per key, whether the block is readable from the
    cluster tier (by any host sharing it)."""
    placed: list[bool]
    timed_out: bool          # the deadline passed with blocks still on their way

    @property
    def num_placed(self) -> int:
        return sum(self.placed)

    @property
    def complete(self) -> bool:
        return all(self.placed)


class Namespace:
    """One model shard's blocks in the daemon: (model id, layout, tenant)."""

    def __init__(self, client: KVClient, model_id: str, layout: KVLayout, tenant: str = ""):
        self.client = client
        self.model_id = model_id
        self.layout = layout
        self.tenant = tenant
        self.namespace_id = namespace_digest(model_id, layout, tenant)
        self._registered = False
        self._tag = shmindex.ns_tag(self.namespace_id)
        # Answer lookups from the daemon's shared-memory index snapshot when it offers one
        # (same host, trusted with the arena); False: always ask over gRPC.
        self.local_lookups = True
        self.local_lookups_answered = 0   # lookups answered without an RPC
        # Read DRAM blocks straight from the arena when the snapshot publishes their slots
        # (see _get_local); False: every get takes a lease over gRPC.
        self.local_gets = True
        self.local_gets_answered = 0      # gets answered without an RPC on their path

    def _register(self) -> None:
        self.client._ensure_session()
        resp = self.client.call("RegisterNamespace", pb.RegisterNamespaceRequest(
            model_id=self.model_id, layout=self.layout.to_proto(pb), tenant=self.tenant))
        if resp.namespace_id != self.namespace_id:
            raise KVStoreError("daemon derived another namespace digest: client and daemon "
                               "versions disagree on key derivation")
        self._registered = True

    def _rpc(self, method: str, make_request, timeout_s: float | None = None):
        """Call with a fresh session id; after a daemon restart re-register and retry once.
        ``timeout_s``: the call's deadline when not the client's (a call that waits).

        Returns (response, session id used)."""
        for attempt in (0, 1):
            sess = self.client._ensure_session()
            if not self._registered:
                self._register()
            sid = sess.event.session_id
            try:
                return self.client.call(method, make_request(sid), timeout_s), sid
            except (NotFound, Unavailable) as exc:
                if attempt or exc.reason not in _REREGISTER:
                    raise
                self._registered = False

    def _acquire_rpc(self, **fields):
        """Acquire (via _rpc) carrying this client's held releases of the session
        (client/heldreleases.py): given back to be sent otherwise if the call fails."""
        held = self.client.held_releases
        carried = None

        def request(sid):
            nonlocal carried
            if carried is None or carried.session_id != sid:   # a retry keeps what it took
                if carried is not None:
                    held.give_back(carried)
                carried = held.take(sid)
            return pb.AcquireRequest(session_id=sid, namespace_id=self.namespace_id,
                                     **fields, **carried.fields())
        try:
            return self._rpc("Acquire", request)
        except BaseException:
            if carried is not None:
                held.give_back(carried)
            raise

    # -- keys --------------------------------------------------------------------------------
    def block_keys(self, token_ids: Sequence[int], parent: bytes | None = None) -> list[bytes]:
        """Keys of every full block of ``token_ids``; ``parent`` continues an earlier chain."""
        return chain_keys(parent or self.namespace_id, token_ids, self.layout.block_tokens)

    # -- operations --------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        blob = pack_keys(keys)
        _wait_for(self._puts_of(keys), self.client.timeout_s)
        snap = self.client.local_index() if self.local_lookups else None
        if snap is not None and self._registered and len(keys) <= self.client.max_batch_blocks:
            tiers = snap.probe(self._tag, blob)
            if tiers is not None:
                n, names = shmindex.prefix(tiers)
                # The remote tier continues a short prefix: only the daemon can ask it.
                if n == len(keys) or not snap.flags & shmindex.REMOTE:
                    self.local_lookups_answered += 1
                    self.client.read_reports.add(self.namespace_id, b"", 0, 0.0, lookups=1)
                    return LookupResult(n, names)
        r, _ = self._rpc("Lookup", lambda sid: pb.LookupRequest(
            namespace_id=self.namespace_id, keys=blob))
        return LookupResult(r.num_cached, [TIER_NAMES.get(t, "?") for t in r.tiers])

    def put(self, keys: Sequence[bytes], kv, parent_key: bytes | None = None) -> Future:
        """Store ``kv`` ([len(keys), *layout.block_shape]) under ``keys`` (one chain, in order).

        Returns a Future of the number of blocks newly written. Shape or dtype errors raise
        InvalidArgument here, before anything is sent.
        """
        blob = pack_keys(keys)
        self._check_batch(len(keys))
        if self.layout.quant:     # quantized namespace: store the packed payload + scales
            rows = quantized.pack(kv, self.layout, len(keys))
        else:
            rows = transfer.block_rows(kv, self.layout, len(keys))
        ready = cuda.ready_event(rows)     # the copy waits for the caller's stream as of now
        fut = self.client.submit(self._put, blob, rows, parent_key or b"", ready)
        self.client._pending_puts.track(keys, fut)
        return fut

    def _puts_of(self, keys: Sequence[bytes]) -> set[Future]:
        return self.client._pending_puts.of(keys)

    def _put(self, blob: bytes, rows, parent_key: bytes, ready=None) -> int:
        # The eviction this Allocate may run orders blocks by their last read: this client's
        # lease-free reads must be known to the daemon first (client/readreports.py).
        self.client.read_reports.flush(self.client.timeout_s)
        alloc, sid = self._rpc("Allocate", lambda sid: pb.AllocateRequest(
            session_id=sid, namespace_id=self.namespace_id, keys=blob, parent_key=parent_key))
        try:
            written = self._write(sid, alloc.allocation_id, list(alloc.offsets), rows, ready)
        except BaseException:
            try:
                self.client.call("Commit", pb.CommitRequest(
                    session_id=sid, allocation_id=alloc.allocation_id, abort=True))
            except KVStoreError:
                pass
            raise
        self.client.call("Commit", pb.CommitRequest(session_id=sid,
                                                    allocation_id=alloc.allocation_id))
        return written

    def _write(self, sid: int, allocation_id: int, offsets: list[int], rows, ready=None) -> int:
        return self.client.datapath.write(sid, allocation_id, offsets, rows, ready)

    def allocate(self, keys: Sequence[bytes], parent_key: bytes | None = None) -> BlockAllocation:
        """Allocate arena slots for ``keys`` (one chain, in order; ``parent_key``: the block
        before them, for prefix-aware eviction) to write in place (see BlockAllocation)."""
        blob = pack_keys(keys)
        self._check_batch(len(keys))
        self.client.read_reports.flush(self.client.timeout_s)    # as in _put
        alloc, sid = self._rpc("Allocate", lambda sid: pb.AllocateRequest(
            session_id=sid, namespace_id=self.namespace_id, keys=blob,
            parent_key=parent_key or b""))
        return BlockAllocation(self, sid, alloc.allocation_id, list(alloc.offsets))

    def acquire(self, keys: Sequence[bytes]) -> BlockLease:
        """Lease the longest stored prefix of ``keys`` (zero-copy access; see BlockLease)."""
        blob = pack_keys(keys)
        self._check_batch(len(keys))
        _wait_for(self._puts_of(keys), self.client.timeout_s)
        t0 = time.monotonic()
        r, sid = self._acquire_rpc(keys=blob)
        return BlockLease(self, sid, r.lease_id, list(r.offsets),
                          [TIER_NAMES.get(t, "?") for t in r.tiers], t0, r.lease_timeout_s,
                          list(r.generations))

    def acquire_layers(self, keys: Sequence[bytes], timeout_s: float | None = None) -> LayerLease:
        """Lease the longest stored prefix of ``keys`` now, its SSD blocks arriving in their
        slots layer by layer (LayerLease.wait_layer) — for a runtime that computes layer l
        while later layers are read. Same host only (FailedPrecondition, reason NOT_ENABLED,
        for a client not granted the arena). Call finish() before trusting what was read.
        ``timeout_s``: the whole stream's deadline (default: the client's timeout_s)."""
        import grpc
        blob = pack_keys(keys)
        self._check_batch(len(keys))
        self.client._ensure_session()
        if not self.client.shared_memory:
            raise FailedPrecondition("a layer-wise get reads the blocks in the daemon's shared "
                                     "arena, which this client has not mapped (another host, "
                                     "or shared_memory=False): use get", Reason.NOT_ENABLED)
        _wait_for(self._puts_of(keys), self.client.timeout_s)
        t0 = time.monotonic()
        held = self.client.held_releases
        for attempt in (0, 1):
            sess = self.client._ensure_session()
            if not self._registered:
                self._register()
            sid = sess.event.session_id
            carried = held.take(sid)
            call = self.client.stream("AcquireLayers", pb.AcquireRequest(
                session_id=sid, namespace_id=self.namespace_id, keys=blob, **carried.fields()),
                timeout_s)
            try:
                first = next(call)
            except grpc.RpcError as exc:
                held.give_back(carried)
                err = from_rpc_error(exc)
                if attempt or not isinstance(err, (NotFound, Unavailable)) \
                        or err.reason not in _REREGISTER:
                    raise err from None
                self._registered = False
                continue
            return LayerLease(self, sid, call, first, t0)
        raise AssertionError("unreachable")

    def get(self, keys: Sequence[bytes], out=None) -> Future:
        """Future of the longest stored prefix of ``keys`` as [found, *layout.block_shape].

        A block evicted since a lookup shortens the result; the caller recomputes the rest.
        ``out`` (a contiguous tensor/array of at least len(keys) blocks) avoids an allocation:
        the future then resolves to its first ``found`` blocks.

        The read contract: every returned block holds exactly the bytes put under its key —
        a block whose arena slot was reused during the copy (its lease ended: expiry, session
        end) is discarded with every later one, never returned (see BlockLease.valid_prefix).
        Read-your-writes: a put of any of these keys that this client started before the get
        is waited for (bounded by the client's timeout_s) before the daemon is asked.

        Same host: the DRAM prefix is read straight from the arena without any RPC when the
        daemon's index snapshot publishes its slots (see _get_local; ``local_gets``).
        """
        blob = pack_keys(keys)
        self._check_batch(len(keys))
        pending = self._puts_of(keys)
        if self.layout.quant:
            staging = quantized.staging_for(out, self.layout, len(keys))  # validates out
            return self.client.submit(self._get_quantized, blob, len(keys), staging, out,
                                      cuda.ready_event(out), pending)
        if out is not None:
            transfer.out_rows(out, self.layout, len(keys))  # validate before submitting
        return self.client.submit(self._get, blob, len(keys), out, cuda.ready_event(out),
                                  pending)

    def _get_quantized(self, blob: bytes, n: int, staging, out, ready=None, pending=()):
        rows = self._get(blob, n, staging, ready, pending)
        with transfer.writing_into(out):
            return quantized.unpack(rows, self.layout, out)

    def _get(self, blob: bytes, n: int, out, ready=None, pending=()):
        _wait_for(pending, self.client.timeout_s)   # read-your-writes (see get)
        want_hbm = self.client.datapath.wants_hbm(out)
        first, grow = 0, False
        if self.local_gets and not want_hbm:
            local = self._get_local(blob, n, out, ready)
            if local is not None:
                got, rows, complete = local
                if complete:
                    self.local_gets_answered += 1
                    return rows[:got]
                # The rest of the keys as before, into the rest of out (or a bigger output)
                first, grow, out = got, out is None, rows
        return self._get_leased(blob, n, out, ready, want_hbm, first, grow)

    def _get_local(self, blob: bytes, n: int, out, ready=None):
        """The lease-free read: the longest prefix of DRAM blocks whose slots the index
        snapshot publishes, copied straight out of the arena. Returns None when it cannot
        answer (no snapshot or generation table, snapshot not answering, no DRAM prefix);
        else (k, out, complete): rows [0, k) of ``out`` (a new output of k blocks when the
        caller gave none) hold exactly the blocks of keys [0, k), and ``complete`` says that
        is the whole answer (else keys [k, n) go through Acquire).

        Why the bytes are right without a lease: the snapshot publishes a block's slot with
        the slot's generation when the slot's bytes were already complete (commit, a finished
        promotion). A slot's generation changes whenever the slot gets a new owner, and a new
        owner writes only after that change; so a generation read AFTER the copy that still
        equals the published one proves the slot had no other owner during the copy: the
        bytes copied are the key's (x86-64 TSO orders the copy's loads before the check's,
        as kvstore/core/slotgen.py explains; elsewhere the SDK maps no snapshot and no
        generation table, kvstore/core/memorder.py, and every get goes through Acquire).
        A block evicted or overwritten under the copy fails the check: it and every later
        block are left to the Acquire path, exactly as a leased read whose lease ended.
        The daemon learns of the reads afterwards (client/readreports.py: stamps, hit
        counts, counters), off this path."""
        t0 = time.monotonic()
        probed = self._probe_local(blob, n)
        if probed is None:
            return None
        snap, path, tiers, offs, expected, k = probed
        client = self.client
        # The snapshot's miss ends the answer unless the remote tier could continue it.
        ends = k == n or (tiers[k] == shmindex.EMPTY and not snap.flags & shmindex.REMOTE)
        if k == 0 and not ends:
            return None
        if out is None:
            out = transfer.new_output(self.layout, k,
                                      like="numpy" if transfer.torch_missing() else "torch")
        valid = 0
        if k:
            # a lease in all but name (id 0: nothing to release): the data path copies it, and
            # its valid_prefix is the generation check, against this path's table
            lease = BlockLease(self, 0, 0, offs[:k].tolist(), [],
                               generations=expected[:k].tolist(),
                               generation_table=path.generations)
            dst = transfer.out_rows(out, self.layout, k)
            with transfer.writing_into(out):
                read = path.read(lease, dst, ready)
            # an arena path proves by generations: valid == unproven == proven prefix
            valid = min(read.valid, read.unproven)
        complete = ends and valid == k
        misses = n - k if complete else 0
        client.read_reports.add(self.namespace_id, blob[:16 * valid], misses,
                                time.monotonic() - t0)
        return valid, out, complete

    def _probe_local(self, blob: bytes, n: int):
        """The index snapshot's answer for a lease-free read: (snapshot, data path, tiers,
        slot offsets, slot generations, k = how many leading keys are DRAM blocks with a
        published slot), or None when no snapshot with slot generations can answer."""
        client = self.client
        pair = client.local_reads() if self._registered else None
        if pair is None or n > client.max_batch_blocks:
            return None
        snap, path = pair
        if path.generations is None or path.generations.table is None:
            return None
        probed = snap.probe_slots(self._tag, blob)
        if probed is None:
            return None
        tiers, offs, expected = probed
        return snap, path, tiers, offs, expected, shmindex.dram_prefix(tiers, offs)

    def read_local(self, keys: Sequence[bytes]) -> ArenaRead:
        """The lease-free read of _get_local without its copy, in the calling thread: the
        longest prefix of ``keys`` held in this host's DRAM arena as views of their slots, for
        a caller that moves the bytes itself (the vLLM connector scatters them straight into
        the engine's pages). No RPC, no copy, no hand-off to the SDK's threads.

        The contract (see ArenaRead): read the views, then call ``verify()``; it returns how
        many leading blocks provably held their keys' bytes throughout the reading, and
        whatever was derived from later blocks must be discarded. The read is empty (0
        blocks) when the snapshot cannot answer (another host, no slot generations, a stale
        snapshot) or the first key is not a DRAM block: ``get`` serves those. A quantized
        namespace's views hold the packed payload (kvstore.client.quantized).
        Read-your-writes as in get: this client's puts of these keys in flight are waited for.
        """
        blob = pack_keys(keys)
        self._check_batch(len(keys))
        _wait_for(self._puts_of(keys), self.client.timeout_s)
        t0 = time.monotonic()
        probed = self._probe_local(blob, len(keys))
        if probed is None or not probed[5]:
            return ArenaRead.empty(self)
        _snap, path, _tiers, offs, expected, k = probed
        offsets = offs[:k].tolist()
        proof = BlockLease(self, 0, 0, offsets, [], generations=expected[:k].tolist(),
                           generation_table=path.generations)
        bb = self.layout.block_bytes
        av = path.arena_view
        av.prefault(offsets, range(k), bb)      # before the caller touches the slots
        return ArenaRead(self, blob[:16 * k], transfer.slot_runs(av, offsets, bb), proof, t0)

    def _get_leased(self, blob: bytes, n: int, out, ready, want_hbm: bool, first: int = 0,
                    grow: bool = False):
        """The leased read of keys [first, n) into rows [first, ...) of ``out`` (rows before
        ``first`` already hold proven blocks); ``grow``: ``out`` holds only those rows (a
        lease-free read's own output), and a bigger one is made if the lease brings more.
        Returns the first valid rows of out."""
        path = self.client.datapath
        t0 = time.monotonic()
        rest = blob[16 * first:] if first else blob
        r, sid = self._acquire_rpc(keys=rest, want_hbm=want_hbm)
        lease = BlockLease(self, sid, r.lease_id, list(r.offsets), [], t0, r.lease_timeout_s,
                           list(r.generations), list(r.hbm_offsets) if want_hbm else None,
                           list(r.hbm_fill) if want_hbm else None)
        found = len(lease)
        try:
            if out is None or (grow and found):
                new = transfer.new_output(self.layout, first + found,
                                          like="numpy" if transfer.torch_missing() else "torch")
                if first:
                    transfer.out_rows(new, self.layout, first)[:] = \
                        transfer.out_rows(out, self.layout, first)
                out = new
            dst = transfer.out_rows(out, self.layout, first + found)[first:]
            with transfer.writing_into(out):
                read = path.read(lease, dst, ready) if found else Read(0, 0)
        except BaseException:
            try:
                lease.release()
            except KVStoreError:
                pass
            raise
        valid, unproven = read.valid, read.unproven
        # Fill slots are published only with proven bytes: generations passed here, and the
        # daemon publishes them only if the lease still holds at the release.
        filled = bool(read.fills) and max(read.fills) < valid
        if unproven < valid or valid < found:
            # A proof is missing, or the lease ended under the copy (which then most likely
            # fails "expired" and would only be logged): confirm, and keep the proven prefix.
            try:
                lease.release(hbm_filled=filled)
            except StaleRead:
                valid = min(valid, unproven)
        else:
            lease.release(wait=False, hbm_filled=filled)
        return out[:first + valid]

    # -- scheduler hints and the recompute planner ---------------------------------------------
    def prefetch(self, keys: Sequence[bytes], deadline_s: float = 1.0,
                 grace_s: float = 0.0, to_hbm: bool | None = None) -> "PrefetchTicket":
        """Hint that a get of ``keys`` is expected within ``deadline_s``: the daemon promotes
        the cached prefix's SSD blocks into DRAM (deadline order) and holds them until the
        deadline plus ``grace_s`` (0: the daemon's default). A hint only: a get works the same
        without it. See ``prefetch_queue`` for a scheduler's queue of requests.

        ``to_hbm``: stage the blocks in the daemon's HBM tier, so the get into a tensor on the
        pool's GPU is device to device. None (default): when this client opened the pool."""
        return self.prefetch_many([(keys, deadline_s)], grace_s, to_hbm)[0]

    def prefetch_queue(self, requests: Sequence[Sequence[bytes]], interval_s: float = 0.1,
                       grace_s: float = 0.0, to_hbm: bool | None = None) -> "list[PrefetchTicket]":
        """Announce upcoming requests in serving order: request i is expected after about
        i * interval_s seconds, so the daemon promotes them in that order."""
        return self.prefetch_many([(keys, i * interval_s) for i, keys in enumerate(requests)],
                                  grace_s, to_hbm)

    def prefetch_many(self, items, grace_s: float = 0.0,
                      to_hbm: bool | None = None) -> "list[PrefetchTicket]":
        """Prefetch (keys, deadline_s) pairs in one call."""
        if to_hbm is None:
            to_hbm = self.client.datapath.pool is not None
        blobs = []
        pending: set[Future] = set()
        for keys, deadline_s in items:
            self._check_batch(len(keys))
            blobs.append(pb.PrefetchItem(keys=pack_keys(keys), deadline_s=deadline_s))
            pending |= self._puts_of(keys)
        _wait_for(pending, self.client.timeout_s)
        # a get that read a prefetched block ended that prefetch (and gave back its share):
        # the daemon must know of this client's lease-free reads first
        self.client.read_reports.flush(self.client.timeout_s)
        r, sid = self._rpc("Prefetch", lambda sid: pb.PrefetchRequest(
            session_id=sid, namespace_id=self.namespace_id, items=blobs, grace_s=grace_s,
            to_hbm=to_hbm))
        return [PrefetchTicket(i, n, m) for i, n, m in zip(r.prefetch_ids, r.blocks, r.to_promote)]

    def cancel_prefetch(self, tickets) -> int:
        """End these prefetches now (their blocks become evictable again); returns how many
        were still pending."""
        ids = [t.prefetch_id if isinstance(t, PrefetchTicket) else int(t) for t in tickets]
        self.client.read_reports.flush(self.client.timeout_s)    # as in prefetch_many
        r, _ = self._rpc("CancelPrefetch", lambda sid: pb.CancelPrefetchRequest(
            session_id=sid, prefetch_ids=[i for i in ids if i]))
        return r.cancelled

    def flush_remote(self, keys: Sequence[bytes], deadline_s: float = 0.0) -> Future:
        """Wait until the blocks of ``keys`` are readable from the daemon's cluster tier: a
        producer handing its KV cache to consumers on other hosts calls this before it says
        the blocks are there. The future resolves to a RemotePlacement once every block is
        placed or ``deadline_s`` passed (0: the daemon's remote_flush_deadline_s); this
        client's puts of the keys are waited for first. The daemon queues the blocks it holds
        that the cluster tier lacks whatever its write policy. The future raises
        FailedPrecondition (reason NOT_ENABLED) when the daemon has no cluster tier, and the
        client's errors (Unavailable, ...) as any call does."""
        blob = pack_keys(keys)
        self._check_batch(len(keys))
        puts = self._puts_of(keys)
        return self.client.submit(self._flush_remote, blob, puts, deadline_s)

    def _flush_remote(self, blob: bytes, puts, deadline_s: float) -> RemotePlacement:
        _wait_for(puts, self.client.timeout_s)
        # the call outlives the client's usual deadline by the flush's own
        wait_s = (deadline_s or FLUSH_DEADLINE_HINT_S) + self.client.timeout_s
        r, _ = self._rpc("FlushRemote", lambda sid: pb.FlushRemoteRequest(
            session_id=sid, namespace_id=self.namespace_id, keys=blob,
            deadline_s=deadline_s), timeout_s=wait_s)
        return RemotePlacement(list(r.placed), r.timed_out)

    def plan_recompute(self, keys: Sequence[bytes], profile, latency_s: float = 0.0,
                       timeout_s: float | None = None):
        """Ask the daemon's planner how much of the cached prefix of ``keys`` to recompute
        (``timeout_s``: the call's deadline, default the client's).

        ``profile`` is this client's kvstore.planner.recompute.PrefillProfile (seconds to prefill k
        tokens). Returns kvstore.planner.recompute.Plan built from the daemon's answer (its tiers and
        measured bandwidths); recompute tokens [0, k), load blocks [k / block_tokens, N)."""
        from kvstore.planner.recompute import Plan

        blob = pack_keys(keys)
        self._check_batch(len(keys))
        _wait_for(self._puts_of(keys), self.client.timeout_s)
        r, _ = self._rpc("PlanRecompute", lambda sid: pb.PlanRecomputeRequest(
            namespace_id=self.namespace_id, keys=blob, latency_s=latency_s,
            profile=pb.PrefillProfile(c0=profile.c0, c1=profile.c1, c2=profile.c2)), timeout_s)
        return Plan(r.recompute_tokens, r.load_blocks_from, r.predicted_s, r.load_all_s,
                    r.recompute_all_s, 0.0, 0.0, num_cached=r.num_cached,
                    tiers=tuple(TIER_NAMES.get(t, "?") for t in r.tiers),
                    bandwidth_bps={"DRAM": r.dram_read_bps, "SSD": r.ssd_read_bps,
                                   "REMOTE": r.remote_read_bps})

    def delete(self, keys: Sequence[bytes]) -> int:
        blob = pack_keys(keys)
        _wait_for(self._puts_of(keys), self.client.timeout_s)   # else the put would land after
        # this client's lease-free reads of these blocks are accounted before they go
        # (client/readreports.py)
        self.client.read_reports.flush(self.client.timeout_s)
        r, _ = self._rpc("Delete", lambda sid: pb.DeleteRequest(
            namespace_id=self.namespace_id, keys=blob))
        return r.deleted

    def _check_batch(self, n: int) -> None:
        if n > self.client.max_batch_blocks:
            raise InvalidArgument(f"batch of {n} blocks exceeds the daemon's max_batch_blocks="
                                  f"{self.client.max_batch_blocks}; split it")


def _wait_for(futures, timeout_s: float) -> None:
    """Wait for these puts to finish, successful or not, for at most timeout_s in all: a failed
    or late put leaves its keys a miss, which the reader already handles."""
    if not futures:
        return
    futures_wait(futures, timeout=timeout_s)
