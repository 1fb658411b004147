"""Zero-copy access to arena slots: leases of stored blocks (gets), allocations for puts.

Both belong to a Namespace and alias the daemon's shared arena through the client's data path
(client/datapath/); a client without the arena can still lease (its gets stream the bytes),
but ``views`` then raises InvalidArgument.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from kvstore.client.errors import KVStoreError, NotFound, Reason, StaleRead, Unavailable
from kvstore.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    from kvstore.client.namespace import Namespace


class BlockLease:
    """Leased blocks, readable in place (zero copy) until :meth:`release`.

    ``views(like)`` gives one byte row per block (torch tensors if like="torch", else numpy)
    that alias the arena. Reading them after release is undefined. ``release`` raises StaleRead
    if the lease expired (or its session ended) first: whatever was read must then be discarded.
    :meth:`valid_prefix` proves a copy without a round trip where the daemon keeps slot
    generations (kvstore/core/slotgen.py).
    """

    def __init__(self, ns: "Namespace", session_id: int, lease_id: int, offsets: list[int],
                 tiers: list[str], requested_at: float = 0.0, timeout_s: float = 0.0,
                 generations: list[int] | None = None, hbm_reads: list[int] | None = None,
                 hbm_fills: list[int] | None = None, generation_table=None):
        """``generation_table``: the slot generations to check against (default: those of
        the client's data path now, i.e. of the daemon that granted the lease)."""
        self.ns = ns
        # The daemon starts the lease clock after it receives the request, i.e. after
        # requested_at: until requested_at + timeout_s (minus a margin for clock granularity)
        # the lease should not expire. An estimate only: a lease also ends with its session,
        # so the clock never proves a copy (see valid_prefix).
        self._valid_until = requested_at + timeout_s - 1.0
        self.lease_id = lease_id
        self.offsets = offsets
        self.tiers = tiers
        # Each DRAM slot's generation when the lease was granted ([]: the daemon keeps none)
        self.generations = generations or []
        # HBM pool slots per block (-1: none): to read from, to fill (client/datapath/hbm.py)
        self.hbm_reads = hbm_reads or []
        self.hbm_fills = hbm_fills or []
        self._table = generation_table if generation_table is not None \
            else ns.client.datapath.generations   # of the daemon that granted the lease
        self.session_id = session_id
        self._released = lease_id == 0

    def __len__(self) -> int:
        return len(self.offsets)

    def surely_valid(self) -> bool:
        """By the clock, the lease has not expired yet (an estimate; see valid_prefix)."""
        return time.monotonic() < self._valid_until

    def valid_prefix(self) -> int | None:
        """After copying out of the arena: how many leading blocks provably held the leased
        bytes throughout (their slots' generations are unchanged since the lease was granted,
        the seqlock check of kvstore/core/slotgen.py). None: no proof available (no generation
        table); only a confirmed :meth:`release` proves the copy then. Blocks without a DRAM
        slot (offset -1, read from HBM) pass here: the caller proves those otherwise."""
        gens = self._table
        if gens is None or gens.table is None or len(self.generations) != len(self.offsets):
            return None
        return gens.valid_prefix(self.offsets, self.generations)

    def views(self, like: str = "torch"):
        """One byte row per block aliasing its slot (InvalidArgument without the arena)."""
        return self.ns.client.datapath.views(self.offsets, self.ns.layout.block_bytes, like)

    def release(self, wait: bool = True, hbm_filled: bool = False) -> None:
        """Give the blocks back. ``wait`` (default): confirm with the daemon that the lease
        held until now — StaleRead if it had ended, and what was read must be discarded.
        ``wait=False`` gives it back without waiting for an answer: only for a caller that
        proved its copy otherwise (valid_prefix). Such a release rides on this client's next
        Acquire or Release of the session, or goes alone within a few milliseconds
        (client/heldreleases.py). ``hbm_filled``: the lease's HBM fill
        slots were written with proven bytes (see client/hbm.py)."""
        if self._released:
            return
        self._released = True
        req = pb.ReleaseRequest(session_id=self.session_id, lease_id=self.lease_id,
                                hbm_filled=hbm_filled)
        if not wait:
            self.ns.client._release_async(req)
            return
        held = self.ns.client.held_releases.take(self.session_id)   # they ride along
        if held.ids:
            req = pb.ReleaseRequest(session_id=self.session_id, lease_id=self.lease_id,
                                    hbm_filled=hbm_filled, **held.fields())
        try:
            self.ns.client.call("Release", req)
        except KVStoreError as exc:
            self.ns.client.held_releases.give_back(held)
            if exc.reason == Reason.EXPIRED_LEASE:
                raise StaleRead(str(exc)) from None
            if isinstance(exc, (NotFound, Unavailable)):
                # The session is gone (daemon restarted): the lease went with it and the bytes
                # may be gone too.
                raise StaleRead(f"lease lost with its session: {exc}", exc.reason) from None
            raise

    def __enter__(self) -> "BlockLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ArenaRead:
    """A lease-free zero-copy read (Namespace.read_local): the first ``len(self)`` blocks of
    its keys, readable in place in this host's DRAM arena until :meth:`verify`.

    ``runs``: (first block, count, rows) — rows a [count, block_bytes] uint8 view (torch;
    numpy without torch) of the arena holding blocks [first, first + count); blocks in adjacent
    slots share a run, so a caller moves each run with one copy. Nothing pins the slots: the
    daemon may evict and reuse one under the read. :meth:`verify`, called once the reading is done, is the proof: how many
    leading blocks held their keys' bytes throughout (their slots' generations are the
    published ones, read after the reading: kvstore/core/slotgen.py). Whatever was derived
    from later blocks must be discarded; reading the views after verify proves nothing.
    """

    def __init__(self, ns: "Namespace", blob: bytes, runs: list, proof: BlockLease | None,
                 started_at: float):
        self.ns = ns
        self.runs = runs
        self._blob = blob             # the packed keys of the blocks read
        self._proof = proof           # a lease in all but name (id 0): its generation check
        self._started_at = started_at
        self._valid: int | None = None
        self._read_s = 0.0
        self._reported = False

    @classmethod
    def empty(cls, ns: "Namespace") -> "ArenaRead":
        return cls(ns, b"", [], None, 0.0)

    def __len__(self) -> int:
        return len(self._blob) // 16

    def verify(self, report: bool = True) -> int:
        """After reading the views: the proven prefix (0 <= n <= len(self)). Idempotent.
        ``report``: queue the proven reads for the daemon now (client/readreports.py, as for
        a get); False: the caller calls :meth:`report` later, off its hot path (the report
        is an RPC from the client's report thread, and work for the daemon, that would
        otherwise run beside whatever the caller does next)."""
        if self._valid is None:
            self._valid = 0
            if self._proof is not None:
                self._valid = self._proof.valid_prefix() or 0
            self._read_s = time.monotonic() - self._started_at
        if report:
            self.report()
        return self._valid

    def valid_now(self) -> int:
        """Before reading the views: how many leading blocks still hold their keys' bytes at
        this moment (the same generation check as :meth:`verify`, which it does not replace:
        it proves nothing about a reading that follows). A caller that reads the views after
        the forward has started (the vLLM connector's layer-wise loads) reads only these and
        takes the rest another way, rather than learn of a slot reused before it began only
        once the forward is over."""
        if self._proof is None:
            return 0
        return min(self._proof.valid_prefix() or 0, len(self))

    def report(self) -> None:
        """Queue the reads :meth:`verify` proved for the daemon (once; nothing before
        verify)."""
        if self._valid is None or self._reported:
            return
        self._reported = True
        if self._valid:
            self.ns.client.read_reports.add(self.ns.namespace_id, self._blob[:16 * self._valid],
                                            0, self._read_s)


class BlockAllocation:
    """Arena slots allocated for a put, writable in place (zero copy) until commit/abort.

    ``offsets[i]`` is -1 for a block the daemon already holds (nothing to write). ``views()``
    gives one writable byte row per block to write (None for those already held), aliasing the
    arena. :meth:`commit` publishes the written blocks; :meth:`abort` gives the slots back. A
    block is visible to readers only after commit, so a half-written block is never served.
    """

    def __init__(self, ns: "Namespace", session_id: int, allocation_id: int, offsets: list[int]):
        self.ns = ns
        self.allocation_id = allocation_id
        self.offsets = offsets
        self.session_id = session_id
        self._done = allocation_id == 0

    def __len__(self) -> int:
        return len(self.offsets)

    def views(self, like: str = "torch"):
        """One writable byte row per block to write, None for those already held
        (InvalidArgument without the arena)."""
        return self.ns.client.datapath.views(self.offsets, self.ns.layout.block_bytes, like)

    def commit(self) -> None:
        self._finish(abort=False)

    def abort(self) -> None:
        """Never raises: the slots come back with the session if the daemon is gone."""
        try:
            self._finish(abort=True)
        except KVStoreError:
            pass

    def _finish(self, abort: bool) -> None:
        if self._done:
            return
        self._done = True
        self.ns.client.call("Commit", pb.CommitRequest(
            session_id=self.session_id, allocation_id=self.allocation_id, abort=abort))




class LayerLease(BlockLease):
    """A lease whose SSD blocks arrive layer by layer (Namespace.acquire_layers): layer ``l``
    of every block is in its slot once :meth:`wait_layer` (l) returns, so a runtime can run
    a forward's first layers on the views while later layers are still being read.

    Until :meth:`finish`, bytes that arrived have not been checked yet: a caller that used
    them keeps what it derived from the first :meth:`finish` blocks only (the daemon checked
    every block's checksum once it was complete, and the slot generations prove that no slot
    changed hands under the reading). A stream that breaks (daemon gone, deadline) raises
    from wait_layer and finishes with 0; its lease is then the daemon's to end.
    ``num_layers``: what the progress counts (the layout's layers). Thread-safe: the loader
    thread and the engine's thread may both wait.
    """

    def __init__(self, ns: "Namespace", session_id: int, call, first, requested_at: float):
        """``call``: the AcquireLayers stream (iterated here), ``first``: its first message."""
        r = first.lease
        super().__init__(ns, session_id, r.lease_id, list(r.offsets),
                         [pb.Tier.Name(t).removeprefix("TIER_") for t in r.tiers],
                         requested_at, r.lease_timeout_s, list(r.generations))
        self.num_layers = first.num_layers
        self.ready = first.layers_ready
        self._call = call
        self._lock = threading.Lock()
        self._verified: int | None = len(self.offsets) if first.done else None
        self._error: BaseException | None = None
        if first.done:
            self.ready = self.num_layers

    def _pull(self) -> None:
        """(under the lock) The next message; a broken stream finishes with nothing proven."""
        try:
            msg = next(self._call)
        except StopIteration:
            msg = None
        except Exception as exc:  # noqa: BLE001 - grpc.RpcError and friends: the stream broke
            msg, self._error = None, exc
        if msg is None:
            self._verified = 0
            self._released = True          # the daemon ends a lease whose stream broke
            return
        self.ready = max(self.ready, msg.layers_ready)
        if msg.done:
            self._verified = min(msg.verified, len(self.offsets))
            self.ready = self.num_layers

    def runs(self) -> list:
        """(first block, count, rows) per run of blocks in adjacent slots: rows a [count,
        block_bytes] uint8 view of the arena (torch; numpy without torch), as ArenaRead.runs,
        so a caller moves each run with one copy per layer."""
        from kvstore.client import transfer
        return transfer.slot_runs(self.ns.client.datapath.arena_view, self.offsets,
                                  self.ns.layout.block_bytes)

    def wait_layer(self, layer: int) -> None:
        """Return once layer ``layer`` of every block is in its slot (KVStoreError, reason
        UNAVAILABLE, if the stream broke first)."""
        with self._lock:
            while self.ready <= layer and self._verified is None:
                self._pull()
            if self.ready <= layer:
                raise Unavailable(f"layer-wise get ended before layer {layer} arrived: "
                                  f"{self._error or 'stream closed'}")

    def finish(self) -> int:
        """Wait for the end of the stream: how many leading blocks hold their keys' bytes (the
        daemon verified them, and their slots provably did not change hands so far)."""
        with self._lock:
            while self._verified is None:
                self._pull()
            n = self._verified
        proven = self.valid_prefix()
        return n if proven is None else min(n, proven)

    def release(self, wait: bool = False, hbm_filled: bool = False) -> None:
        """Give the blocks back (after finish). Default wait=False: a caller checks finish()
        (the slot generations) before it trusts what it read; see BlockLease.release."""
        if self._verified is None:
            self._call.cancel()            # not finished: the daemon ends the lease
            self._released = True
            return
        super().release(wait=wait, hbm_filled=hbm_filled)
