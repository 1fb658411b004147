"""The read path: a get, from the lookup to the accounting, as one walk (docs/architecture.md,
"The get path"). The servicer decodes a request, calls one method here and encodes the answer.

    lookup(namespace, keys) -> (n, tiers)
        1. local    BlockStore.lookup: the committed prefix in DRAM, SSD (and HBM), touched
        2. remote   a short local prefix continues in the cluster tier, under the tier's own
                    deadline (RemoteReads.probe); blocks found there may start filling DRAM at
                    once (on_lookup_found)

    get(session, namespace, keys, want_hbm) -> Get
        1. fill     the remote continuation of the local prefix lands in DRAM slots first,
                    waited for under the tier's read deadline (RemoteReads.fill)
        2. lease    BlockStore.acquire: the prefix any tier the client can read holds, pinned
        3. hits     every HitObserver.on_hits(leased ids), once per get
        4. promote  SSD-only blocks read into DRAM (or HBM); the lease is cut to what arrived
        5. answer   DRAM offsets, slot generations, tiers, and the HBM read and fill slots
        After step 2, a failure or a cancellation (the client's deadline) abandons the lease:
        nothing stays pinned for a get nobody answers.

    read_streamed, release              the lease's bytes over gRPC; the lease's end
    report_reads(...)                   lease-free same-host reads, after the fact: counted as
                                        step 2 counts DRAM hits, then step 3
    prefetch, cancel_prefetch           hints that bring blocks up before the get
    plan(...)                           the recompute planner over the tiers a lookup finds

Step 3 comes before step 4 on purpose: a get that must wait for a prefetch still in flight is
a late prefetch (the get shares its transfer), and telling the prefetcher after the promotion
would count it on time.

The tiers and the prefetcher are handed in by the composition root (kvstore.daemon.server);
this module imports none of them and reads them through the small protocols below. Everything
runs on the daemon's event loop.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

from kvstore.core.errors import FailedPrecondition, Reason
from kvstore.core.keys import KEY_BYTES
from kvstore.planner.recompute import Plan as Split
from kvstore.planner.recompute import PrefillProfile, plan_recompute
from kvstore.store.blockstore import BlockStore
from kvstore.store.sessions import Lease


class HitObserver(Protocol):
    """Told of every get's hits: the write policies that write what is read (SSD and remote
    write_through_selective) and the prefetcher (a get ends the prefetches of its blocks)."""

    def on_hits(self, bids: list[int]) -> None:
        """A get (leased, or lease-free and reported) read these committed blocks. Called once
        per get, on the event loop; must not block, and must not raise for its own I/O."""


class RemoteReads(Protocol):
    """What the read path asks of the cluster tier (kvstore.tiers.remote)."""

    async def probe(self, namespace_id: bytes, keys_blob: bytes, n_local: int) -> int:
        """How many blocks after the first ``n_local`` the remote holds, under its deadline;
        0 when it is down, slow or the input is bad."""

    def on_lookup_found(self, namespace_id: bytes, keys_blob: bytes) -> None:
        """A lookup found blocks remotely: the tier may start filling them now."""

    async def fill(self, namespace_id: bytes, keys_blob: bytes) -> tuple[int, int]:
        """Bring the remote continuation of the local prefix into DRAM, under the read
        deadline: (n local, m found remotely). Never raises for the remote."""

    def prefetch(self, namespace_id: bytes, keys_blob: bytes) -> None:
        """A hint: fill in the background."""

    def read_bps(self) -> float:
        """Measured (or assumed) read throughput, for the planner."""


class Prefetches(Protocol):
    """The prefetcher (kvstore.prefetch.prefetcher.Prefetcher), as the read path uses it."""

    def submit(self, session_id: int, namespace_id: bytes, items: list[tuple[bytes, float]],
               grace_s: float = 0.0, to_hbm: bool = False) -> list[tuple[int, int, int]]: ...

    def cancel(self, session_id: int, prefetch_ids: list[int]) -> int: ...


@dataclass
class Get:
    """A get's answer. ``lease`` None: nothing is cached (every list empty). ``offsets``: the
    DRAM slot of each block of the readable prefix (-1: HBM only); ``generations``: each slot's
    generation (the same-host proof); ``tiers``: where each block was found ("HBM", "DRAM",
    "SSD" — now promoted — or "REMOTE" — now filled into DRAM); ``hbm_offsets`` / ``hbm_fill``:
    for a want_hbm get, the HBM slot to read each block from and the one to fill (-1: none)."""
    lease: Lease | None
    offsets: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    hbm_offsets: list[int] = field(default_factory=list)
    hbm_fill: list[int] = field(default_factory=list)


class LayerGet:
    """A layer-wise get's answer (ReadPath.get_layers): ``get`` as Get's (the leased prefix,
    its slots and generations; SSD blocks' slots are being filled), ``num_layers`` the steps
    the progress counts. ``next_ready()`` waits for the next step (the layers in place now),
    None once every step is in; then ``finish()`` ends the read: how many leading blocks are
    readable (the lease keeps those). ``abandon()``: the caller stopped listening (a client
    gone); the lease ends once the reads under way have landed. Nothing to wait for (no SSD
    block): every step is in at once."""

    def __init__(self, get: Get, num_layers: int, run=None, store: BlockStore | None = None,
                 session_id: int = 0):
        self.get = get
        self.num_layers = num_layers
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = None
        self._store, self._session_id = store, session_id
        if run is not None:
            self._task = asyncio.ensure_future(run(self._queue.put_nowait))
        else:
            self._queue.put_nowait(None)

    @property
    def streaming(self) -> bool:
        return self._task is not None

    async def next_ready(self) -> int | None:
        return await self._queue.get()

    async def finish(self) -> int:
        if self._task is None:
            return len(self.get.offsets)
        return await asyncio.shield(self._task)

    def abandon(self) -> None:
        lease, store, sid = self.get.lease, self._store, self._session_id
        if lease is None or store is None:
            return
        if self._task is None or self._task.done():
            store.abandon_lease(sid, lease)
        else:
            self._task.add_done_callback(lambda _: store.abandon_lease(sid, lease))


@dataclass
class Planned:
    """PlanRecompute's answer: the tiers of the cached prefix (local, then remote), the read
    bandwidth assumed for each tier, and the planner's split."""
    tiers: list[str]
    bandwidth: dict[str, float]
    plan: Split


class ReadPath:
    def __init__(self, store: BlockStore, *, ssd=None, remote: RemoteReads | None = None,
                 prefetcher: Prefetches | None = None,
                 observers: Sequence[HitObserver] = (), dram_read_bps: float = 0.0):
        """``ssd``: the SSD tier when configured (the planner asks its read bandwidth);
        ``remote``: the cluster tier; ``prefetcher``: None when prefetch is off;
        ``observers``: told of every get's hits, in this order; ``dram_read_bps``: the
        memcpy-scale figure the planner assumes for DRAM and HBM reads."""
        self.store = store
        self.ssd = ssd
        self.remote = remote
        self.prefetcher = prefetcher
        self.observers = tuple(observers)
        self.dram_read_bps = dram_read_bps

    @property
    def lease_timeout_s(self) -> float:
        return self.store.lease_timeout_s

    # -- lookup ------------------------------------------------------------------------------
    async def lookup(self, namespace_id: bytes, keys_blob: bytes) -> tuple[int, list[str]]:
        """(n, tiers): the first n keys are cached, tiers[i] says where ("HBM", "DRAM", "SSD",
        "REMOTE"). Raises KVStoreError for bad input (unknown namespace, malformed keys)."""
        n, tiers = self.store.lookup(namespace_id, keys_blob)
        remote = self.remote
        if remote is None or n >= len(keys_blob) // KEY_BYTES:
            return n, tiers
        m = await remote.probe(namespace_id, keys_blob, n)
        if m:
            remote.on_lookup_found(namespace_id, keys_blob)
        return n + m, tiers + ["REMOTE"] * m

    # -- get ---------------------------------------------------------------------------------
    async def get(self, session_id: int, namespace_id: bytes, keys_blob: bytes,
                  want_hbm: bool = False) -> Get:
        """Lease the longest cached prefix of the keys, with every block in DRAM (or HBM for a
        client that reads it) when this returns. Raises KVStoreError for bad input; the
        cluster tier's faults only shorten the prefix."""
        store = self.store
        want_hbm = want_hbm and store.hbm is not None
        # 1. fill: a local miss continues in the cluster tier; its blocks land in DRAM first
        n_local, n_remote = ((await self.remote.fill(namespace_id, keys_blob))
                             if self.remote is not None else (0, 0))
        # 2. lease
        promote: list[int] | None = [] if self.ssd is not None else None
        lease, offsets, tiers = store.acquire(session_id, namespace_id, keys_blob,
                                              promote_out=promote, want_hbm=want_hbm)
        if lease is None:
            return Get(None)
        try:
            # 3. hits
            self._hits(lease.block_ids)
            if n_remote:
                tiers = [("REMOTE" if n_local <= i < n_local + n_remote and t == "DRAM" else t)
                         for i, t in enumerate(tiers)]
            # 4. promote
            if promote:
                lease, offsets = await store.promote(session_id, lease, promote,
                                                     to_hbm=want_hbm)
                tiers = tiers[:len(offsets)]
            # 5. answer
            hbm_reads, hbm_fill = store.hbm_answer(lease) if want_hbm else ([], [])
        except BaseException:   # failed or cancelled (client deadline): no lease is answered
            store.abandon_lease(session_id, lease)
            raise
        if lease is None:
            return Get(None)
        return Get(lease, offsets, tiers, store.slot_generations(offsets), hbm_reads, hbm_fill)

    async def get_layers(self, session_id: int, namespace_id: bytes,
                         keys_blob: bytes) -> LayerGet:
        """Lease the longest cached prefix of the keys (local tiers only: no cluster fill, no
        HBM), answering at once: SSD-only blocks get DRAM slots now and are read into them
        layer by layer (SSDTier.read_layers) while the caller reads what has arrived. Raises
        KVStoreError for bad input."""
        store = self.store
        promote: list[int] | None = [] if self.ssd is not None else None
        lease, offsets, tiers = store.acquire(session_id, namespace_id, keys_blob,
                                              promote_out=promote)
        layout = store.namespace(namespace_id).layout
        if lease is None:
            return LayerGet(Get(None), layout.num_layers)
        try:
            self._hits(lease.block_ids)
            if not promote:
                return LayerGet(Get(lease, offsets, tiers, store.slot_generations(offsets)),
                                layout.num_layers)
            offsets, mine = await store.begin_layers(lease, promote)
        except BaseException:
            store.abandon_lease(session_id, lease)
            raise
        ssd = self.ssd
        ranges = ssd.layer_ranges(layout)
        answered = len(offsets)
        slots = store.dram.promotion_slots()

        async def run(progress) -> int:
            # Progress counts layers: one range of the whole block jumps to all of them. The
            # reads are a task of their own, never cancelled with this one: they own the slots
            # until they settle them (SSDTier.read_layers).
            reads = asyncio.ensure_future(ssd.read_layers(
                mine, layout, slots, lambda r: progress(r * layout.num_layers // len(ranges))))
            placed = 0
            try:
                placed = await asyncio.shield(reads)
            finally:
                progress(None)
                kept = store.end_layers(session_id, lease, mine, placed, answered)
            return kept
        got = Get(lease, offsets, tiers[:answered], store.slot_generations(offsets))
        return LayerGet(got, layout.num_layers, run, store, session_id)

    def read_streamed(self, session_id: int, lease_id: int) -> Iterator[tuple[int, bytes]]:
        """(index, bytes) of each leased block, copied while the lease holds (a remote
        client's get: BlockStore.read_remote)."""
        return self.store.read_remote(session_id, lease_id)

    def release(self, session_id: int, lease_id: int, hbm_filled: bool = False) -> None:
        self.store.release(session_id, lease_id, hbm_filled)

    def release_many(self, session_id: int, lease_ids) -> list[int]:
        """End leases whose copies the client proved itself (releases it held back for its next
        call), best effort: one that already ended (expired, released, never granted) is
        skipped. Returns the ids ended now. Raises only for the session (unknown session)."""
        store = self.store
        store.session(session_id)
        ended = []
        for lid in lease_ids:
            try:
                store.release(session_id, lid)
            except FailedPrecondition:
                continue
            ended.append(lid)
        return ended

    def report_reads(self, namespace_id: bytes, keys_blob: bytes, misses: int = 0,
                     lookups: int = 0) -> int:
        """Lease-free DRAM reads, after the fact: accounted as a get's DRAM hits are
        (BlockStore.report_reads), then the hits step of a get. Returns blocks counted."""
        bids = self.store.report_reads(namespace_id, keys_blob, misses, lookups)
        if bids:
            self._hits(bids)
        return len(bids)

    def _hits(self, bids: list[int]) -> None:
        for o in self.observers:
            o.on_hits(bids)

    # -- prefetch ----------------------------------------------------------------------------
    def prefetch(self, session_id: int, namespace_id: bytes, items: Iterable[tuple[bytes, float]],
                 grace_s: float = 0.0, to_hbm: bool = False) -> list[tuple[int, int, int]]:
        """Queue prefetches of (keys, deadline_s) items: (prefetch id, blocks, SSD-only blocks)
        each (kvstore.prefetch.prefetcher.Prefetcher.submit). The cluster tier starts filling
        each item's remote continuation in the background. Raises FailedPrecondition
        (NOT_ENABLED) when prefetch is off."""
        pf = self.prefetcher
        if pf is None:
            raise FailedPrecondition("prefetch is not enabled in this daemon", Reason.NOT_ENABLED)
        items = list(items)
        if self.remote is not None:
            for keys, _ in items:
                self.remote.prefetch(namespace_id, keys)
        return pf.submit(session_id, namespace_id, items, grace_s,
                         to_hbm=to_hbm and self.store.hbm is not None)

    def cancel_prefetch(self, session_id: int, prefetch_ids: list[int]) -> int:
        pf = self.prefetcher
        return pf.cancel(session_id, prefetch_ids) if pf is not None else 0

    # -- the recompute planner ---------------------------------------------------------------
    async def plan(self, namespace_id: bytes, keys_blob: bytes, profile: PrefillProfile,
                   latency_s: float) -> Planned:
        """Where the cached prefix is (a lookup, counted as one, with the remote probe but no
        background fill) and the planner's split for it (kvstore.planner.recompute)."""
        store = self.store
        ns = store.namespace(namespace_id)
        n, tiers = store.lookup(namespace_id, keys_blob)
        if self.remote is not None:
            tiers = tiers + ["REMOTE"] * await self.remote.probe(namespace_id, keys_blob, n)
        ssd = self.ssd
        ssd_bps = ssd.read_bps() if ssd is not None else 0.0
        if ssd is not None and not ssd_bps and "SSD" in tiers:
            # a cold daemon must not guess: measure on a few of the request's own SSD blocks
            _, _, bids = store.committed_prefix(namespace_id, keys_blob)
            ssd_bps = await ssd.measure_read_bps(bids.tolist())
        # HBM copies always have a DRAM or SSD copy too; a client that reads HBM only gains
        bw = {"HBM": self.dram_read_bps, "DRAM": self.dram_read_bps, "SSD": ssd_bps,
              "REMOTE": self.remote.read_bps() if self.remote is not None else 0.0}
        return Planned(tiers, bw, plan_recompute(tiers, ns.layout.block_tokens,
                                              ns.layout.block_bytes, bw, profile, latency_s))
