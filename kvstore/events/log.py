"""The event log: tier changes recorded on the daemon's event loop, taken by the publisher thread.

The block table (the owner of block state) calls :meth:`EventLog.stored` / :meth:`removed` in
its state-change methods, with the blocks' namespaces, keys and parent keys copied out of its
columns at that moment (block ids are recycled; keys are not). Recording is an append to a
deque: no lock, no encoding, no I/O on the loop. The publisher thread takes records in order,
groups them into batches, encodes and sends them.

Bounded: at most ``max_pending`` records wait. Past that a record is dropped, never waited for:
its block events are counted in :attr:`dropped_events` and :attr:`drops` grows, which makes the
publisher skip one sequence number (a gap every subscriber sees). Snapshots (:meth:`snapshot`)
are few (the publisher admits a handful at a time) and never dropped.

Tenants: with ``tenants`` given, only blocks of namespaces whose tenant is named are published
(filtered by the publisher thread with :meth:`allowed_mask`); the others never leave the daemon.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np

STORED, REMOVED, CLEARED, SNAPSHOT = "stored", "removed", "cleared", "snapshot"
# One block's change, recorded as a plain tuple (cheaper than a Record on the per-block paths):
# (STORED_ONE, medium, ns index, key bytes, parent key bytes or None) or
# (REMOVED_ONE, medium, ns index, key bytes, None).
STORED_ONE, REMOVED_ONE = "stored1", "removed1"


@dataclass(frozen=True)
class Record:
    """One tier change of blocks ``keys`` ([n, 2] uint64: 16-byte keys) of namespaces ``ns``
    ([n] namespace indexes), in ``medium``. Stored records carry each block's parent key
    (``parents``, valid where ``has_parent``)."""
    kind: str
    medium: str = ""
    ns: np.ndarray | None = None
    keys: np.ndarray | None = None
    parents: np.ndarray | None = None
    has_parent: np.ndarray | None = None
    client: bytes = b""           # SNAPSHOT: the replay client that asked
    blocks: tuple = ()            # SNAPSHOT: stored records, one per medium


class EventLog:
    def __init__(self, max_pending: int = 65536, tenants: tuple[str, ...] = ()):
        self._pending: collections.deque = collections.deque()   # Records and tuples
        self._max = max_pending
        self._tenants = frozenset(tenants)
        self._allowed = np.zeros(0, dtype=bool)     # by namespace index (replaced, not mutated)
        self._block_tokens: list[int] = []
        self.wake = threading.Event()               # set when a record waits
        self.dropped_events = 0                     # block events never published
        self.drops = 0                              # records dropped: one sequence gap each

    # -- the loop side (called by the block table) --------------------------------------------
    def on_namespace(self, ns) -> None:
        """A namespace was registered (kvstore.store.blockstore.Namespace, by index)."""
        allowed = not self._tenants or ns.tenant in self._tenants
        self._allowed = np.append(self._allowed, allowed)
        self._block_tokens.append(ns.layout.block_tokens)

    def stored(self, medium: str, ns, keys, parents, has_parent) -> None:
        self._put(Record(STORED, medium, ns, keys, parents, has_parent), len(keys))

    def removed(self, medium: str, ns, keys) -> None:
        self._put(Record(REMOVED, medium, ns, keys), len(keys))

    def stored_one(self, medium: str, ns: int, key: bytes, parent: bytes | None) -> None:
        self._put((STORED_ONE, medium, ns, key, parent), 1)

    def removed_one(self, medium: str, ns: int, key: bytes) -> None:
        self._put((REMOVED_ONE, medium, ns, key, None), 1)

    def cleared(self) -> None:
        self._put(Record(CLEARED), 1)

    def snapshot(self, client: bytes, blocks: tuple) -> None:
        """Queue a snapshot answer behind every change recorded so far (so the sequence number
        it is tagged with covers exactly the changes it includes)."""
        self._pending.append(Record(SNAPSHOT, client=client, blocks=blocks))
        self.wake.set()

    def _put(self, rec, n_events: int) -> None:
        if len(self._pending) >= self._max:
            self.dropped_events += n_events
            self.drops += 1
            return
        self._pending.append(rec)
        if not self.wake.is_set():
            self.wake.set()

    # -- the publisher thread's side --------------------------------------------------------------
    def take(self, limit: int) -> list:
        """Up to ``limit`` records (Records, or STORED_ONE / REMOVED_ONE tuples), oldest
        first."""
        out = []
        pending = self._pending
        while pending and len(out) < limit:
            out.append(pending.popleft())
        return out

    def pending(self) -> int:
        return len(self._pending)

    def allowed_mask(self) -> np.ndarray:
        return self._allowed

    def block_tokens(self, ns_index: int) -> int:
        return self._block_tokens[ns_index]
